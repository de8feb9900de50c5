"""`offload-rt` commands: demo, generate and plan here; cache-sim, serve, convert, quantize
and eval in their modules of this package, each a thin command over the public API."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import offload_rt
from offload_rt.analysis.traces import write_trace
from offload_rt.checkpoint import CheckpointError
from offload_rt.cli import cachesim, convert, quantize, serve
from offload_rt.cli import eval as eval_cmd
from offload_rt.cli.options import (
    add_hybrid_options,
    add_model_argument,
    add_model_options,
    add_ray_options,
    load_model,
    model_folder,
    placement_text,
    ray_options,
)
from offload_rt.config import DTYPE_NAMES
from offload_rt.demo import demo_name, make_demo_checkpoint
from offload_rt.engine import GenerationResult, OffloadModel, RequestError
from offload_rt.experts.formats import expert_nbytes
from offload_rt.hub import HubError
from offload_rt.models import FAMILIES, open_checkpoint, read_config

DEMO_CACHE_SHARE = 4  # a quarter of the demo's experts on the device, so the cache works


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "offload_rt"


def _add_load_options(p: argparse.ArgumentParser, cache_experts: int | None) -> None:
    p.add_argument("--prompt", default="The quick brown fox", help="text to continue")
    p.add_argument(
        "--token-ids", default=None, help="comma-separated prompt token ids (instead of --prompt)"
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    add_model_options(p, cache_experts)


def _add_hybrid_plan_options(p: argparse.ArgumentParser) -> None:
    """What the hybrid plan depends on (`load`'s options of the same names)."""
    p.add_argument("--device", default="cpu", help="hybrid: the torch device (cuda, cpu)")
    p.add_argument("--cache-experts", type=int, default=None, help="hybrid: device slots")
    p.add_argument("--link-gbps", type=float, default=None, help="hybrid: a simulated link")
    p.add_argument(
        "--compute-on-miss", action="store_true", help="hybrid: misses may run on the CPU"
    )
    add_hybrid_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offload-rt", description=offload_rt.__doc__)
    parser.add_argument("--version", action="version", version=offload_rt.__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="make a small random checkpoint once, then generate")
    demo.add_argument("--cache-dir", type=Path, default=None, help="where the demo model lives")
    demo.add_argument(
        "--family", default="mixtral", choices=sorted(FAMILIES), help="the demo model's family"
    )
    _add_load_options(demo, cache_experts=None)
    gen = sub.add_parser("generate", help="generate from a checkpoint folder or hub id")
    add_model_argument(gen)
    gen.add_argument("--trace", type=Path, default=None, help="write the routing trace (msgpack)")
    _add_load_options(gen, cache_experts=None)
    plan = sub.add_parser(
        "plan",
        help="print where the Ray backend would place each expert, or with --cpu-experts / "
        "--cpu-moe the local backend's hybrid CPU/device placement",
    )
    add_model_argument(plan)
    plan.add_argument("--dtype", default=None, choices=list(DTYPE_NAMES))
    add_ray_options(plan)
    _add_hybrid_plan_options(plan)
    cachesim.add_parser(sub)
    serve.add_parser(sub)
    convert.add_parser(sub)
    quantize.add_parser(sub)
    eval_cmd.add_parser(sub)
    return parser


def _generate(model: OffloadModel, args: argparse.Namespace) -> tuple[GenerationResult, float]:
    prompt = args.prompt
    if args.token_ids is not None:
        try:
            prompt = [int(t) for t in args.token_ids.split(",")]
        except ValueError as e:
            raise RequestError(f"--token-ids must be comma-separated integers ({e})") from e
    start = time.perf_counter()
    result = model.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    return result, time.perf_counter() - start


def _report(model: OffloadModel, result: GenerationResult, seconds: float) -> None:
    n = len(result.token_ids)
    print(f"tokens: {n} new ({result.finish_reason}) in {seconds:.2f} s: {n / seconds:.1f} tok/s")
    stats = model.stats()
    print("expert cache: " + ", ".join(f"{k}={_figure(v)}" for k, v in stats.items()))


def _figure(v: int | float) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def cmd_demo(args: argparse.Namespace) -> int:
    folder = (args.cache_dir or default_cache_dir()) / demo_name(args.family)
    print(f"demo checkpoint: {make_demo_checkpoint(folder, family=args.family)}")
    if args.backend == "local" and args.cache_experts is None:
        args.cache_experts = max(1, read_config(folder).num_experts_total // DEMO_CACHE_SHARE)
    with load_model(args, folder) as model:
        result, seconds = _generate(model, args)
        print("note: the demo model has random weights, so its text is noise")
        print(f"prompt: {args.prompt!r}")
        print(f"text (random weights): {result.text!r}")
        _report(model, result, seconds)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    folder = model_folder(args.model_dir)
    with load_model(args, folder, record_routing=args.trace is not None) as model:
        placement = placement_text(model.placement)
        if placement is not None:
            print(placement)
        result, seconds = _generate(model, args)
        print(result.text if result.text is not None else result.token_ids)
        _report(model, result, seconds)
        if args.trace is not None:
            trace = model.routing_trace()
            write_trace(args.trace, trace)
            print(f"routing trace: {len(trace.passes)} passes -> {args.trace}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    if args.cpu_experts is not None or args.cpu_moe is not None:
        return _hybrid_plan(args)
    import ray

    from offload_rt.distributed.cluster import join_ray, plan_for_cluster
    from offload_rt.engine.loader import resolve_dtype

    ckpt = open_checkpoint(model_folder(args.model_dir))
    cfg = ckpt.config
    expert_bytes = expert_nbytes(cfg, resolve_dtype(args.dtype, ckpt))
    connected = join_ray(args.address)
    try:
        opts = ray_options(args)
        plan = plan_for_cluster(cfg.grid, expert_bytes, opts)
        print(plan.format())
    finally:
        if connected:
            ray.shutdown()
    return 0


def _hybrid_plan(args: argparse.Namespace) -> int:
    """The local backend's hybrid placement, on costs measured here (one expert timed)."""
    from offload_rt.engine.hybrid import local_placement
    from offload_rt.engine.loader import resolve_device, resolve_dtype

    if args.backend != "local":
        raise ValueError("--cpu-experts and --cpu-moe place experts for the local backend")
    ckpt = open_checkpoint(model_folder(args.model_dir))
    try:
        placement = local_placement(
            ckpt,
            resolve_device(args.device),
            resolve_dtype(args.dtype, ckpt),
            args.cache_experts,
            args.gpu_memory_gb,
            args.cpu_experts,
            args.cpu_moe,
            args.link_gbps,
            args.compute_on_miss,
            args.routing_trace,
        )
    finally:
        ckpt.close()
    print(placement_text(placement))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "demo": cmd_demo,
        "generate": cmd_generate,
        "plan": cmd_plan,
        "cache-sim": cachesim.run,
        "serve": serve.run,
        "convert": convert.run,
        "quantize": quantize.run,
        "eval": eval_cmd.run,
    }
    try:
        return commands[args.command](args)
    except (CheckpointError, RequestError, ValueError, HubError) as e:
        print(f"offload-rt: error: {e}", file=sys.stderr)
        return 2
