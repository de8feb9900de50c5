"""Command-line options shared by several `offload-rt` commands: the model's device, its
offloading and the Ray backend, and loading the model from them."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from offload_rt.config import DTYPE_NAMES
from offload_rt.distributed.cluster import RayOptions
from offload_rt.engine import OffloadModel, load
from offload_rt.engine.hybrid import Placement
from offload_rt.experts.policies import DEFAULT_POLICY, RUNTIME_POLICIES
from offload_rt.hub import parse_hub_id, resolve_model
from offload_rt.model.interface import PREDICT_FROM

GIB = 1 << 30


def add_model_argument(p: argparse.ArgumentParser, name: str = "model_dir") -> None:
    """The positional MODEL: a checkpoint folder, or a hub id that `model_folder` resolves."""
    p.add_argument(
        name,
        metavar="MODEL",
        help="checkpoint folder, or Hugging Face hub id org/name[@revision] (downloaded once "
        "into the hub cache; HF_HOME, HF_TOKEN, HF_HUB_OFFLINE apply; a folder always wins)",
    )


def model_folder(spec: str) -> Path:
    """The folder of a MODEL argument; a hub id not cached while offline raises HubError."""
    return resolve_model(spec)


def hub_repo(spec: str) -> str | None:
    """The hub repo (org/name) a MODEL argument names; None for a local folder."""
    hub_id = parse_hub_id(spec)
    return hub_id.repo if hub_id is not None else None


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
        help="GiB of device memory the model may use. Local: dense weights, a KV/activation "
        "reserve, and expert slots in the rest (instead of --cache-experts); Ray: each GPU "
        "actor's, all for expert slots (default: %.0f; an L4 or a 4090 wants ~20)"
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


def cpu_experts_value(text: str) -> int | str:
    """--cpu-experts: "auto" or a count per MoE layer."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'auto' or an integer, not {text!r}") from None


def add_hybrid_options(p: argparse.ArgumentParser) -> None:
    """The hybrid CPU/device placement (local backend, behind a link)."""
    p.add_argument(
        "--cpu-experts",
        type=cpu_experts_value,
        default=None,
        metavar="auto|N",
        help="compute a fixed set of experts on the CPU from host RAM, never loaded: 'auto' "
        "(the planner's choice from the budget and measured costs) or N per MoE layer",
    )
    p.add_argument(
        "--cpu-moe",
        type=int,
        default=None,
        metavar="N",
        help="every expert of the first N MoE layers on the CPU (llama.cpp's --n-cpu-moe)",
    )
    p.add_argument(
        "--routing-trace",
        type=Path,
        default=None,
        help="a routing trace (generate --trace) whose expert frequencies the planner uses "
        "(default: uniform routing)",
    )


def add_offload_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prefetch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load the next layer's predicted experts ahead (default: on when the cache is "
        "capped behind a link: a GPU or --link-gbps)",
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
    p.add_argument(
        "--cache-policy",
        default=DEFAULT_POLICY,
        choices=list(RUNTIME_POLICIES),
        help="which resident expert a miss evicts (default: %(default)s)",
    )
    add_hybrid_options(p)


def add_model_options(p: argparse.ArgumentParser, cache_experts: int | None) -> None:
    """Where the model runs and how its experts are offloaded: what `load_model` reads."""
    p.add_argument(
        "--cache-experts",
        type=int,
        default=cache_experts,
        help="most experts resident on the device at once (default: %(default)s; None: all)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, choices=list(DTYPE_NAMES))
    p.add_argument(
        "--dense-quant",
        default=None,
        choices=["int8", "int4"],
        help="quantize attention, dense MLPs and lm_head at load, as llama.cpp does (changes "
        "outputs by the quantization error; the experts keep the checkpoint's format)",
    )
    p.add_argument(
        "--lm-head-quant",
        default=None,
        choices=["int8", "int4"],
        help="with --dense-quant, lm_head in this format instead (llama.cpp's q4_0 keeps it in "
        "6 bits)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the model's math (default: torch's, one per core)",
    )
    p.add_argument(
        "--link-gbps", type=float, default=None, help="simulate a host->device link of this GB/s"
    )
    add_offload_options(p)
    add_ray_options(p)


def placement_text(placement: Placement | None) -> str | None:
    """The local model's device budget and hybrid plan for people, when either was asked."""
    if placement is None or (placement.plan is None and placement.budget is None):
        return None
    lines = [] if placement.budget is None else [placement.budget.describe()]
    if placement.plan is not None:
        lines.append(placement.plan.format())
    return "\n".join(lines)


def load_model(args: argparse.Namespace, path: Path, record_routing: bool = False) -> OffloadModel:
    """`offload_rt.load` with what `add_model_options` parsed."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return load(
        path,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        cache_experts=args.cache_experts,
        ray_options=ray_options(args) if args.backend == "ray" else None,
        link_gbps=args.link_gbps,
        prefetch=args.prefetch,
        prefetch_from=args.prefetch_from,
        compute_on_miss=args.compute_on_miss,
        cache_policy=args.cache_policy,
        record_routing=record_routing,
        dense_quant=args.dense_quant,
        lm_head_quant=args.lm_head_quant,
        gpu_memory_gb=args.gpu_memory_gb if args.backend == "local" else None,
        cpu_experts=args.cpu_experts,
        cpu_moe_layers=args.cpu_moe,
        routing_trace=args.routing_trace,
    )
