"""Command-line options shared by several `offload-rt` commands (Ray, offloading)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from offload_rt.distributed.cluster import RayOptions
from offload_rt.model.mixtral import PREDICT_FROM

GIB = 1 << 30


def add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="local", choices=["local", "ray"])
    p.add_argument(
        "--address", default=None, help="Ray: none starts a local Ray; 'auto' joins the cluster"
    )
    p.add_argument("--expert-actors", type=int, default=None, help="Ray: actors (default: 1/GPU)")
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help="Ray: GiB of each GPU for expert slots (default: %.0f; an L4 or a 4090 wants ~20)"
        % (RayOptions.gpu_memory_bytes / GIB),
    )


def ray_options(args: argparse.Namespace) -> RayOptions:
    """The RayOptions the command line asks for (the defaults where it says nothing)."""
    opts = RayOptions(address=args.address, expert_actors=args.expert_actors)
    if args.gpu_memory_gb is None:
        return opts
    if args.gpu_memory_gb <= 0:
        raise ValueError(f"--gpu-memory-gb must be positive, got {args.gpu_memory_gb}")
    return replace(opts, gpu_memory_bytes=int(args.gpu_memory_gb * GIB))


def add_offload_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-prefetch",
        dest="prefetch",
        action="store_false",
        default=None,
        help="do not load the next layer's predicted experts ahead (default: on when capped)",
    )
    p.add_argument(
        "--prefetch-from",
        default="both",
        choices=list(PREDICT_FROM),
        help="where the next layer's experts are guessed (default: %(default)s)",
    )
    p.add_argument(
        "--compute-on-miss",
        action="store_true",
        help="run a missing expert on the CPU from host RAM when that beats copying it",
    )
