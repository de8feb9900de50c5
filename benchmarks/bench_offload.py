"""Decode tokens/s with the experts behind a capped device cache and a host->device link,
against the bound set by the bytes the link must move and by the model's own compute.

Model: bench_local.py's random checkpoint (hidden 1024, intermediate 2816, 8 layers, 8
experts, top-2, vocab 32000, float32; one expert is 34.6 MB). Cache: a quarter of the experts
(16 of 64). Link: simulated at 16 GB/s on a CPU (`load(link_gbps=16)`: every move into a
device slot lasts bytes / bandwidth on the loader thread), or the real PCIe link on a GPU.

Configurations, timed in alternating repeats (each run warms the model — every expert once
through the link, leaving the cache in the same state — prefills a 16-token prompt, then times
greedy decode steps at batch 1; figures are medians over repeats):
  resident            every expert on the device, no link: the compute bound's measurement
  no prefetch         capped cache, loads on demand (overlapping only the layer's resident
                      experts' compute)
  prefetch (FROM)     the next layer's experts guessed after the layer's attention, its MoE
                      output, or both, and loaded ahead
  compute on miss     missing experts run on the CPU from host RAM when the cost model says so
  prefetch + c.o.m.   both

The bound: a decode token cannot take less than its compute (the resident run's time per
token) nor less than its link time (bytes moved per token / bandwidth); the bound is
1 / max(the two). The bytes are those the no-prefetch run moved (LRU's demand misses: what
this cache must move without speculation); each run's own bytes are printed too. Wasted
prefetch loads raise a run's own bytes, so they are never used to lower the bound.

Run from the repository root: `python benchmarks/bench_offload.py` (about 3 minutes on 2
cores); `--quick` runs the 2-layer model with few steps as a smoke test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from bench_local import MODEL, PROMPT_LEN, checkpoint, make_prompts
from transformers.utils import logging as hf_logging

import offload_rt
from offload_rt import OffloadModel
from offload_rt.engine import BatchDecoder
from offload_rt.experts.prefetch import PrefetchStats
from offload_rt.models import read_config

CAPPED = ("no prefetch", "prefetch (both)", "compute on miss")  # the headline rows


@dataclass(frozen=True)
class Options:
    workdir: Path  # where the random checkpoint is cached
    layers: int  # decoder layers of the checkpoint
    steps: int  # timed decode steps per run
    repeats: int  # timed runs per configuration; the median is reported
    device: torch.device
    link_gbps: float | None  # simulated link; None: the device's real one


@dataclass(frozen=True)
class Run:
    tokens: list[int]  # greedy tokens of the timed steps
    seconds: float  # wall time of the timed steps
    gained: dict[str, float]  # counters gained during the timed steps
    prefetch: dict[str, float]  # prefetch ratios over the timed steps (empty: prefetch off)


def parse_options() -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/offload_rt_bench"))
    p.add_argument("--steps", type=int, default=48, help="timed decode steps per run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--quick", action="store_true", help="2 layers, 8 steps, 1 repeat")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument(
        "--link-gbps", type=float, default=None, help="simulated link (default: 16 on a CPU)"
    )
    a = p.parse_args()
    device = torch.device(a.device)
    link = a.link_gbps if a.link_gbps is not None or device.type == "cuda" else 16.0
    if a.quick:
        return Options(a.workdir, 2, steps=8, repeats=1, device=device, link_gbps=link)
    return Options(a.workdir, MODEL["num_hidden_layers"], a.steps, a.repeats, device, link)


CONFIGS: dict[str, dict | None] = {  # load options of the capped model; None: resident
    "resident": None,
    "no prefetch": dict(prefetch=False),
    "prefetch (attention)": dict(prefetch=True, prefetch_from="attention"),
    "prefetch (moe)": dict(prefetch=True, prefetch_from="moe"),
    "prefetch (both)": dict(prefetch=True, prefetch_from="both"),
    "compute on miss": dict(prefetch=False, compute_on_miss=True),
    "prefetch + c.o.m.": dict(prefetch=True, compute_on_miss=True),
}


COUNTERS = ("hits", "misses", "bytes_loaded", "load_wait_seconds", "host_computed")


def decode(
    model: OffloadModel, prompt: list[int], steps: int, counters: tuple[str, ...] = COUNTERS
) -> Run:
    """`steps` greedy decode steps at batch 1 after `prompt`, timed; the `counters` of
    `model.stats()` they gained, and the prefetch ratios when prefetch is on."""
    decoder = BatchDecoder(model.model, [prompt], PROMPT_LEN + steps)
    logits = decoder.prefill()
    prefetcher = model.backend.prefetcher
    tracker = None if prefetcher is None else prefetcher.tracker
    before, tracked = model.stats(), asdict(tracker.stats) if tracker else {}
    tokens: list[int] = []
    _sync(model.device)
    start = time.perf_counter()
    for _ in range(steps):
        tokens.append(int(logits.argmax(-1)))
        logits = decoder.step([tokens[-1]], [True])
    _sync(model.device)
    seconds = time.perf_counter() - start
    after = model.stats()
    gained = {k: after[k] - before.get(k, 0) for k in counters if k in after}
    prefetch = {}
    if tracker is not None:
        now = asdict(tracker.stats)
        prefetch = PrefetchStats(**{k: now[k] - tracked[k] for k in now}).as_dict()
    return Run(tokens, seconds, gained, prefetch)


def measure(folder: Path, capacity: int, prompt: list[int], opts: Options) -> dict:
    """The model with every expert resident, loaded once; the capped one behind the link,
    loaded afresh with each configuration's options for each run (the options are fixed for
    a model's life) and warmed before it, so every run starts from the same cache state."""
    runs: dict[str, list[Run]] = {name: [] for name in CONFIGS}
    dev = opts.device
    with offload_rt.load(folder, device=dev, prefetch=False) as resident:
        for repeat in range(opts.repeats):
            for name, config in CONFIGS.items():
                if config is None:
                    resident.warm()
                    runs[name].append(decode(resident, prompt, opts.steps))
                    continue
                capped = offload_rt.load(
                    folder, device=dev, cache_experts=capacity, link_gbps=opts.link_gbps, **config
                )
                with capped:
                    capped.warm()
                    runs[name].append(decode(capped, prompt, opts.steps))
            print(f"repeat {repeat + 1}/{opts.repeats} done", flush=True)
    return runs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_token(runs: list[Run], key: str) -> float:
    return statistics.median(r.gained.get(key, 0.0) / len(r.tokens) for r in runs)


def seconds_per_token(runs: list[Run]) -> float:
    return statistics.median(r.seconds / len(r.tokens) for r in runs)


def link_bytes_per_s(opts: Options, expert_bytes: int) -> float:
    """The simulated link's bandwidth, or the device's measured pinned host->device copy."""
    if opts.link_gbps is not None:
        return opts.link_gbps * 1e9
    host = torch.empty(expert_bytes // 4, pin_memory=True)
    dev = torch.empty_like(host, device=opts.device)
    best = float("inf")
    for _ in range(5):
        _sync(opts.device)
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        _sync(opts.device)
        best = min(best, time.perf_counter() - start)
    return expert_bytes / best


def memcpy_seconds(expert_bytes: int) -> float:
    """One expert copied host RAM -> host RAM by this CPU, best of 5: what a simulated link
    that really copied would cost on top of its link time (it binds instead; store.py)."""
    src, dst = torch.randn(expert_bytes // 4), torch.empty(expert_bytes // 4)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return best


def report(runs: dict[str, list[Run]], bandwidth: float, expert_bytes: int) -> None:
    compute = seconds_per_token(runs["resident"])
    demand = per_token(runs["no prefetch"], "bytes_loaded")
    link = demand / bandwidth
    bound = 1 / max(compute, link)
    which = "compute" if compute >= link else "transfer"
    print(
        f"\ncompute bound: {compute * 1e3:.1f} ms/token with every expert resident "
        f"-> {1 / compute:.2f} tokens/s\n"
        f"transfer bound: the no-prefetch run moved {demand / 1e6:.0f} MB/token "
        f"({demand / expert_bytes:.2f} experts) -> {link * 1e3:.1f} ms at "
        f"{bandwidth / 1e9:.1f} GB/s -> {1 / link:.2f} tokens/s\n"
        f"bound = 1 / max({compute * 1e3:.1f}, {link * 1e3:.1f}) ms = {bound:.2f} tokens/s: "
        f"the {which} bound applies"
    )
    print(
        f"\n{'configuration':<21} {'tok/s':>6} {'/bound':>7} {'vs no-pf':>8} {'MB/tok':>7} "
        f"{'link ms':>7} {'wait ms':>7} {'on CPU':>6} {'recall':>6} {'prec':>5} {'on time':>7}"
    )
    ratios = {}
    for name, rs in runs.items():
        to_bound = [
            max(res.seconds / len(res.tokens), link) / (r.seconds / len(r.tokens))
            for res, r in zip(runs["resident"], rs)
        ]
        to_base = [
            (b.seconds / len(b.tokens)) / (r.seconds / len(r.tokens))
            for b, r in zip(runs["no prefetch"], rs)
        ]
        ratios[name] = statistics.median(to_bound)
        moved = per_token(rs, "bytes_loaded")
        pf = rs[-1].prefetch
        scores = (
            f"{pf['prefetch_recall']:>6.2f} {pf['prefetch_precision']:>5.2f} "
            f"{pf['prefetch_on_time']:>7.2f}"
            if pf
            else f"{'-':>6} {'-':>5} {'-':>7}"
        )
        print(
            f"{name:<21} {1 / seconds_per_token(rs):>6.2f} {ratios[name]:>7.0%} "
            f"{statistics.median(to_base):>7.2f}x {moved / 1e6:>7.0f} "
            f"{moved / bandwidth * 1e3:>7.1f} {per_token(rs, 'load_wait_seconds') * 1e3:>7.1f} "
            f"{per_token(rs, 'host_computed'):>6.2f} {scores}"
        )
    print(
        "(tok/s: median over repeats; /bound and vs no-pf: medians of each repeat's ratio to "
        "the same repeat's bound (its resident run) and no-prefetch run; MB/tok and link ms: "
        "bytes the run moved per token and the link's busy time for them; wait ms: the "
        "compute thread waiting on loads per token; on CPU: missing experts run from host RAM "
        "per token; recall/prec/on time: prefetch, last repeat)"
    )
    for name in ("prefetch (both)", "prefetch + c.o.m."):
        verdict = "met" if ratios[name] >= 0.8 else "NOT met"
        print(f"target {name} >= 80% of the bound: {ratios[name]:.0%} -> {verdict}")


def check_tokens(runs: dict[str, list[Run]]) -> None:
    ref = runs["resident"][0].tokens
    differ = [name for name, rs in runs.items() if any(r.tokens != ref for r in rs)]
    print(
        "greedy tokens of every configuration " + (f"DIFFER: {differ}" if differ else "identical")
    )


def main() -> None:
    opts = parse_options()
    hf_logging.disable_progress_bar()
    folder = checkpoint(opts.workdir, opts.layers)
    cfg = read_config(folder)
    capacity = cfg.num_experts_total // 4
    expert_bytes = cfg.expert_numel * 4
    bandwidth = link_bytes_per_s(opts, expert_bytes)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {opts.device}"
        + (f" ({torch.cuda.get_device_name(opts.device)})" if opts.device.type == "cuda" else "")
        + f"; {cfg.num_hidden_layers} layers, cache {capacity}/{cfg.num_experts_total} experts; "
        f"link {'simulated' if opts.link_gbps else 'measured'} {bandwidth / 1e9:.1f} GB/s "
        f"({expert_bytes / bandwidth * 1e3:.2f} ms per {expert_bytes / 1e6:.1f} MB expert); "
        f"{opts.steps} decode steps, {opts.repeats} repeats; load average "
        f"{os.getloadavg()[0]:.2f} (other work on the machine skews every figure)"
    )
    if opts.device.type == "cpu":
        print(
            f"one expert memcpy'd by this CPU: {memcpy_seconds(expert_bytes) * 1e3:.2f} ms "
            "(a simulated link binds the slot to the host buffer instead: a DMA costs no CPU)"
        )
    prompt = make_prompts(1, cfg.vocab_size)[0]
    runs = measure(folder, capacity, prompt, opts)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    check_tokens(runs)
    report(runs, bandwidth, expert_bytes)


if __name__ == "__main__":
    main()
