"""`offload-rt serve MODEL`: the HTTP server (OpenAI-compatible + native msgpack); MODEL is a
checkpoint folder or a hub id."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from offload_rt.cli.options import (
    add_model_argument,
    add_model_options,
    hub_repo,
    load_model,
    model_folder,
    placement_text,
)

API_KEY_ENV = "OFFLOAD_RT_API_KEY"  # read here, at the edge: keeps the key out of `ps`

T = TypeVar("T")


def on_a_passing_thread(fn: Callable[[], T]) -> T:
    """fn() on a thread that ends with it. Loading runs parallel torch ops, and the OpenMP team
    of threads they start lives as long as the thread that started them; the scheduler's thread
    decodes with a team of its own, and two teams on the same cores throttle each other's
    barriers (an int8 decode step 13.5 -> 24.7 ms on 2 cores; docs/architecture.md, CPU
    kernels). With this the scheduler's team is the only one."""
    with ThreadPoolExecutor(1, thread_name_prefix="offload-rt-load") as pool:
        return pool.submit(fn).result()


def _here(fn: Callable[[], T]) -> T:
    return fn()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (OpenAI API + msgpack)")
    add_model_argument(p)
    add_model_options(p, cache_experts=None)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", default=None, help=f"require this bearer token (or set ${API_KEY_ENV})"
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="model id in the API (default: the hub id, or the folder's name)",
    )
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="positions per request (default: context)"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from offload_rt.engine.scheduler import SchedulerConfig
    from offload_rt.server import ServerConfig, build_app

    scheduler = SchedulerConfig(
        max_batch=args.max_batch, max_len=args.max_model_len, max_queue=args.max_queue
    )
    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        served_model_name=args.served_model_name or hub_repo(args.model_dir),
        scheduler=scheduler,
    )
    folder = model_folder(args.model_dir)
    # Ray's driver is set up on the main thread (its signal handling: Ctrl-C removes the actors
    # and ends with status 0); its experts run in the actors' processes
    loading = on_a_passing_thread if args.backend == "local" else _here
    with loading(lambda: load_model(args, folder)) as model:
        app = loading(lambda: build_app(model, config))
        auth = "bearer token required" if config.api_key else "no API key"
        placement = placement_text(model.placement)
        if placement is not None:
            print(placement, flush=True)
        print(f"serving {args.model_dir} on http://{args.host}:{args.port} ({auth})", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
