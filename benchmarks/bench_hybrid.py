"""Decode tokens/s of the hybrid CPU/device placement beside CPU-only and cache-only, behind a
host->device link and a device memory budget that holds a quarter of the experts.

Model: bench_local.py's random checkpoint (hidden 1024, intermediate 2816, 8 layers, 8
experts, top-2, vocab 32000, float32; one expert 34.6 MB). Budget: `gpu_memory_gb` holding the
dense weights, the KV/activation reserve and 16 expert slots (a quarter of 64). Link:
simulated at 16 GB/s on a CPU, the real one on a GPU.

Placements, each loaded afresh per run and timed in alternating rounds (each run warms the
model, every expert once through its path, prefills a 16-token prompt, then times greedy
decode steps at batch 1; figures are medians over rounds, after an untimed warm-up run):
  resident        every expert on the device, no budget, no link: the compute reference
  cpu only        every expert computed on the CPU from host RAM (cpu_experts = all)
  cache only      the budget's slots as a cache behind the link (prefetch on, its default)
  cache + c.o.m.  the same, misses run on the CPU when that beats the copy
  hybrid (auto)   the planner's CPU set and slots, from the budget and the measured costs
  --cpu-moe N     llama.cpp's placement: the first N MoE layers on the CPU, N chosen so the
                  rest fit the slots

On a machine without a GPU the "device" is this same CPU: a resident expert costs what a CPU
expert does, and only the link differs. The figures then show the mechanism and the cost of
the link, not a GPU's trade-off (where the device computes an expert in microseconds).

Run from the repository root: `python benchmarks/bench_hybrid.py` (about 4 minutes on 2
cores); `--quick` runs the 2-layer model with few steps as a smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_families import cpu_model
from bench_local import MODEL, checkpoint, make_prompts
from bench_offload import Run, decode
from transformers.utils import logging as hf_logging

import offload_rt
from offload_rt.engine.hybrid import ACTIVATION_BYTES, GIB, RESERVE_TOKENS
from offload_rt.experts.formats import expert_nbytes
from offload_rt.models import dense_nbytes, kv_bytes_per_token, open_checkpoint

COUNTERS = ("misses", "bytes_loaded", "load_wait_seconds", "host_computed", "cpu_computed")


@dataclass(frozen=True)
class Options:
    workdir: Path
    layers: int
    steps: int
    repeats: int
    device: torch.device
    link_gbps: float | None  # None: the device's real link


def parse_options() -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/offload_rt_bench"))
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    p.add_argument("--repeats", type=int, default=5, help="rounds; medians are reported")
    p.add_argument("--quick", action="store_true", help="2 layers, 8 steps, 1 round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--link-gbps", type=float, default=None, help="default: 16 on a CPU")
    a = p.parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    link = a.link_gbps if a.link_gbps is not None or device.type == "cuda" else 16.0
    if a.quick:
        return Options(a.workdir, 2, 8, 1, device, link)
    return Options(a.workdir, MODEL["num_hidden_layers"], a.steps, a.repeats, device, link)


def budget_gb(folder: Path, slots: int, dtype: torch.dtype) -> float:
    """A budget of the dense weights, the reserve and `slots` experts (plus half an expert
    that is not a slot, so that rounding cannot lose one)."""
    ckpt = open_checkpoint(folder)
    cfg = ckpt.config
    reserve = RESERVE_TOKENS * kv_bytes_per_token(cfg, dtype) + ACTIVATION_BYTES
    expert = expert_nbytes(cfg, dtype)
    dense = dense_nbytes(ckpt, dtype)
    ckpt.close()
    return (dense + reserve + (slots + 0.5) * expert) / GIB


def placements(folder: Path, opts: Options) -> dict[str, dict | None]:
    """Load options of each placement; None: every expert resident, no link."""
    cfg = open_checkpoint(folder).config
    slots = cfg.num_experts_total // 4
    link = dict(link_gbps=opts.link_gbps, gpu_memory_gb=budget_gb(folder, slots, torch.float32))
    cpu_moe = len(cfg.grid.layers) - slots // cfg.grid.experts
    return {
        "resident": None,
        "cpu only": dict(**link, cpu_experts=cfg.grid.experts),
        "cache only": dict(**link),
        "cache + c.o.m.": dict(**link, compute_on_miss=True),
        "hybrid (auto)": dict(**link, cpu_experts="auto"),
        f"--cpu-moe {cpu_moe}": dict(**link, cpu_moe_layers=cpu_moe),
    }


def measure(folder: Path, opts: Options) -> tuple[dict[str, list[Run]], dict[str, dict]]:
    """Runs per placement, and each placement's plan text and predictions (last round)."""
    configs = placements(folder, opts)
    prompt = make_prompts(1, open_checkpoint(folder).config.vocab_size)[0]
    runs: dict[str, list[Run]] = {name: [] for name in configs}
    plans: dict[str, dict] = {}
    with offload_rt.load(folder, device=opts.device) as model:  # compiles the CPU kernels
        decode(model, prompt, 4, COUNTERS)
    for repeat in range(opts.repeats):
        for name, config in configs.items():
            options = config or {}
            with offload_rt.load(folder, device=opts.device, **options) as model:
                model.warm()
                runs[name].append(decode(model, prompt, opts.steps, COUNTERS))
                placement = model.placement
                if placement is not None and placement.plan is not None:
                    plans[name] = {
                        "text": placement.budget.describe() + "\n" + placement.plan.format(),
                        "predicted": dict(placement.plan.predicted),
                    }
        print(f"round {repeat + 1}/{opts.repeats} done, load {os.getloadavg()[0]:.2f}", flush=True)
    return runs, plans


def per_token(runs: list[Run], key: str) -> float:
    return statistics.median(r.gained.get(key, 0.0) / len(r.tokens) for r in runs)


def seconds_per_token(runs: list[Run]) -> float:
    return statistics.median(r.seconds / len(r.tokens) for r in runs)


def report(runs: dict[str, list[Run]], plans: dict[str, dict], opts: Options) -> None:
    base = runs["cache only"]
    # one plan's figures for the three it compares (each load measures its own costs, and
    # on a busy machine those vary); --cpu-moe's from its own plan
    auto = plans.get("hybrid (auto)", {}).get("predicted", {})
    predicted = {
        "cpu only": auto.get("cpu only"),
        "cache only": auto.get("cache only"),
        "hybrid (auto)": auto.get("this plan"),
    }
    predicted.update(
        {name: p["predicted"]["this plan"] for name, p in plans.items() if "cpu-moe" in name}
    )
    print(
        f"\n{'placement':<16} {'tok/s':>6} {'ms/tok':>7} {'vs cache':>8} {'pred ms':>7} "
        f"{'MB/tok':>7} {'wait ms':>7} {'CPU/tok':>7}"
    )
    for name, rs in runs.items():
        ratio = statistics.median(
            (b.seconds / len(b.tokens)) / (r.seconds / len(r.tokens)) for b, r in zip(base, rs)
        )
        pred = predicted.get(name)
        cpu = per_token(rs, "cpu_computed") + per_token(rs, "host_computed")
        print(
            f"{name:<16} {1 / seconds_per_token(rs):>6.2f} {seconds_per_token(rs) * 1e3:>7.1f} "
            f"{ratio:>7.2f}x {'-' if pred is None else f'{pred * 1e3:.1f}':>7} "
            f"{per_token(rs, 'bytes_loaded') / 1e6:>7.0f} "
            f"{per_token(rs, 'load_wait_seconds') * 1e3:>7.1f} {cpu:>7.2f}"
        )
    print(
        "(tok/s, ms/tok: medians over rounds; vs cache: median of each round's ratio to the "
        "same round's cache-only run; pred ms: expert milliseconds per token predicted by the "
        "hybrid (auto) plan for cpu only, cache only and itself, by its own plan for --cpu-moe "
        "(attention and the rest left out); MB/tok: bytes over the link per token; "
        "wait ms: the compute thread waiting on loads per token; CPU/tok: experts computed on "
        "the CPU from host RAM per token, the CPU set's and misses')"
    )


def check_tokens(runs: dict[str, list[Run]]) -> None:
    ref = runs["resident"][0].tokens
    differ = [name for name, rs in runs.items() if any(r.tokens != ref for r in rs)]
    print("greedy tokens of every placement " + (f"DIFFER: {differ}" if differ else "identical"))


def main() -> None:
    opts = parse_options()
    hf_logging.disable_progress_bar()
    folder = checkpoint(opts.workdir, opts.layers)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = (
        f"{opts.device} ({torch.cuda.get_device_name(opts.device)})"
        if opts.device.type == "cuda"
        else "cpu: the 'device' is this CPU too (no GPU here)"
    )
    link = f"simulated {opts.link_gbps} GB/s" if opts.link_gbps else "the real link"
    print(
        f"{now}; {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"device {device}; link {link}; {opts.layers} layers; {opts.steps} decode steps, "
        f"{opts.repeats} rounds; load average {os.getloadavg()[0]:.2f} at the start"
    )
    runs, plans = measure(folder, opts)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    for name in ("hybrid (auto)", next(n for n in runs if n.startswith("--cpu-moe"))):
        if name in plans:
            print(f"\nplan of {name}:\n{plans[name]['text']}")
    check_tokens(runs)
    report(runs, plans, opts)


if __name__ == "__main__":
    main()
