"""Decode throughput of the local backend against transformers, and against the bandwidth bound.

Measures greedy decode tokens/s (decode steps only; prefill and a warm-up run are not timed) of
  (a) transformers' `MixtralForCausalLM` (uncompiled forward with its default attention and
      experts kernels, named in the output; its own DynamicCache),
  (b) offload_rt's local backend on the CPU with every expert resident,
  (c) offload_rt with `cache_experts` a quarter of all experts (LRU hits and misses reported),
at batch 1 and batch 8, on one random Mixtral checkpoint (hidden 1024, 8 layers, 8 experts,
top-2, fp32) written once with `save_pretrained` into --workdir and reused afterwards.
(a) and (b) are timed in alternating repeats, so background load hits both alike; each figure
is the median over repeats.

The batch-1 bound: bytes of weights one decode token reads (attention, norms, router, 2 experts
per layer, lm_head, one embedding row) divided by the bandwidth of a matrix-vector product
(`F.linear` of a (1, K) vector with four 256 MiB fp32 matrices in turn: 1 GiB per pass, best
of 5 passes, measured before and after the decode runs and the better taken). Cycling over
1 GiB reads each matrix from DRAM, as decode weights are, and not from a large L3 cache.
A second bound, the replay bound: the same matrix-vector products one batch-1 token does, on
the runtime's own weights and shapes, run back to back with nothing else (best of 7). The
probe's K = 4096 matrices stream faster through MKL than the model's K = 1024 ones, so the
replay bound is the floor this machine's BLAS puts under a step of this model, and the
fraction of it a runtime reaches is what the runtime itself loses.

Run from the repository root: `python benchmarks/bench_local.py` (about 3 minutes on 2 cores);
`--quick` runs a 2-layer model with few steps as a smoke test.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.utils import logging as hf_logging

import offload_rt
from offload_rt import ModelConfig, OffloadModel
from offload_rt.engine import BatchDecoder
from offload_rt.models import read_config

MODEL = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    # spread logits, so greedy tokens of the two engines can be compared without near-ties
    initializer_range=0.1,
    tie_word_embeddings=False,
)
PROMPT_LEN = 16  # tokens per prompt
BATCHES = (1, 8)
MIB = 2**20


@dataclass(frozen=True)
class Options:
    workdir: Path  # where the random checkpoint is cached
    layers: int  # decoder layers of the checkpoint
    steps: int  # timed decode steps per run
    repeats: int  # timed runs per engine and batch; the median is reported
    device: torch.device  # where both engines run


@dataclass(frozen=True)
class DecodeRun:
    tokens: list[list[int]]  # greedy tokens per row, decode steps only
    seconds: float  # wall time of the decode steps
    cache: dict[str, int] | None  # offload_rt cache counters gained during decode


Runner = Callable[[list[list[int]], int], DecodeRun]


def parse_options() -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/offload_rt_bench"))
    p.add_argument("--steps", type=int, default=48, help="timed decode steps per run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--quick", action="store_true", help="2 layers, 8 steps, 1 repeat")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    a = p.parse_args()
    device = torch.device(a.device)
    if a.quick:
        return Options(a.workdir, layers=2, steps=8, repeats=1, device=device)
    return Options(a.workdir, MODEL["num_hidden_layers"], a.steps, a.repeats, device)


def checkpoint(workdir: Path, layers: int) -> Path:
    """This benchmark's random checkpoint folder with `layers` layers, written on first use."""
    folder = workdir / f"mixtral-d{MODEL['hidden_size']}-l{layers}-e{MODEL['num_local_experts']}"
    return write_random(folder, {**MODEL, "num_hidden_layers": layers})


def write_random(folder: Path, model: dict) -> Path:
    """A random float32 Mixtral of config `model` in `folder`, unless already there (written
    to a temporary name, then renamed, so an interrupted build is never reused)."""
    if (folder / "config.json").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"writing a random checkpoint to {folder} ...", flush=True)
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**model, dtype="float32")).save_pretrained(partial)
    partial.rename(folder)
    return folder


def make_prompts(count: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (count, PROMPT_LEN), generator=g).tolist()


def hf_runner(model: torch.nn.Module) -> Runner:
    # transformers 5.2x renamed `past_key_values` to `cache`; older 5.x knows only the former
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def run(prompts: list[list[int]], steps: int) -> DecodeRun:
        ids = torch.tensor(prompts, device=model.device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, logits = out[key], out.logits[:, -1]
        tokens: list[list[int]] = []
        start = time.perf_counter()
        for _ in range(steps):
            nxt = logits.argmax(-1)  # (B,)
            tokens.append(nxt.tolist())
            out = model(input_ids=nxt[:, None], use_cache=True, **{key: cache})
            cache, logits = out[key], out.logits[:, -1]
        return DecodeRun(_by_row(tokens), time.perf_counter() - start, None)

    return run


def ort_runner(model: OffloadModel) -> Runner:
    def run(prompts: list[list[int]], steps: int) -> DecodeRun:
        decoder = BatchDecoder(model.model, prompts, PROMPT_LEN + steps)
        logits = decoder.prefill()
        live = [True] * len(prompts)
        before = model.stats()
        tokens: list[list[int]] = []
        start = time.perf_counter()
        for _ in range(steps):
            tokens.append(logits.argmax(-1).tolist())
            logits = decoder.step(tokens[-1], live)
        seconds = time.perf_counter() - start
        after = model.stats()
        gained = {k: after[k] - before[k] for k in ("hits", "misses", "evictions")}
        return DecodeRun(_by_row(tokens), seconds, gained)

    return run


def _by_row(per_step: list[list[int]]) -> list[list[int]]:
    return [list(row) for row in zip(*per_step)]


def warm_all_experts(model: OffloadModel) -> None:
    """Every expert resident (`OffloadModel.warm`), or an error saying how many are not."""
    resident, total = model.warm(), model.config.num_experts_total
    if resident != total:
        raise RuntimeError(f"warm-up left {resident} of {total} experts resident")


def measure(
    runners: dict[str, Runner], prompts: list[list[int]], steps: int, repeats: int
) -> dict[str, list[DecodeRun]]:
    """One untimed warm-up each, then `repeats` rounds in which every runner runs once."""
    for run in runners.values():
        run(prompts, min(steps, 4))
    runs: dict[str, list[DecodeRun]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            runs[name].append(run(prompts, steps))
    return runs


def tokens_per_s(runs: list[DecodeRun]) -> float:
    return statistics.median(len(r.tokens) * len(r.tokens[0]) / r.seconds for r in runs)


def matvec_bandwidth(
    device: torch.device, matrix_mib: int = 256, total_mib: int = 1024, passes: int = 5
) -> float:
    """Bytes/s of F.linear((1, K) vector, (N, K) fp32 matrix), best of `passes` passes, each
    over every matrix: a pass reads about as much as one decode token, and a matrix is read
    again only after the others have flushed it from the cache."""
    k = 4096
    n = matrix_mib * MIB // (4 * k)
    mats = [torch.randn(n, k, device=device) for _ in range(total_mib // matrix_mib)]
    x = torch.randn(1, k, device=device)
    best = float("inf")
    for _ in range(passes):
        _sync(device)
        start = time.perf_counter()
        for w in mats:
            F.linear(x, w)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return len(mats) * matrix_mib * MIB / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def token_bytes(cfg: ModelConfig, itemsize: int) -> int:
    """Weight bytes one batch-1 decode token reads."""
    d, hd = cfg.hidden_size, cfg.head_dim
    attn = 2 * d * cfg.num_attention_heads * hd + 2 * d * cfg.num_key_value_heads * hd
    experts = cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size
    layer = attn + 2 * d + cfg.experts_per_layer * d + experts  # + 2 norms + router
    total = cfg.num_hidden_layers * layer + d + cfg.vocab_size * d + d  # + norm, lm_head, row
    return total * itemsize


def bench_full(
    folder: Path, prompts: list[list[int]], opts: Options
) -> tuple[dict[int, dict[str, list[DecodeRun]]], float]:
    """transformers and offload_rt (all experts resident), alternating, at each batch size;
    and the replay floor of one token's products (`replay_seconds`)."""
    hf = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(opts.device)
    print(
        f"transformers: attention {hf.config._attn_implementation}, "
        f"experts {getattr(hf.config, '_experts_implementation', 'eager')}",
        flush=True,
    )
    with offload_rt.load(folder, device=opts.device) as ort:
        warm_all_experts(ort)
        runners = {"transformers": hf_runner(hf), "offload_rt": ort_runner(ort)}
        runs = {b: measure(runners, prompts[:b], opts.steps, opts.repeats) for b in BATCHES}
        replay = replay_seconds(ort, opts.device)
    return runs, replay


def token_matrices(ort: OffloadModel) -> list[torch.Tensor]:
    """The weight matrices one batch-1 decode token multiplies, as the runtime holds them:
    per layer q/k/v stacked, o, the router and two experts' w13 and w2; then lm_head."""
    mats = []
    store = ort.backend.store
    for lw in ort.model.weights.layers:
        mats += [lw.attn.wqkv, lw.attn.wo, lw.mlp.router]
    for slot in range(2 * len(ort.model.grid.layers)):
        mats += list(store.weights(slot))
    return [*mats, ort.model.weights.lm_head]


def replay_seconds(ort: OffloadModel, device: torch.device, passes: int = 7) -> float:
    """Best time of a token's own matrix-vector products run back to back, nothing else:
    the floor this machine's BLAS puts under a decode step of these weights."""
    mats = token_matrices(ort)
    xs = [torch.randn(1, w.shape[1], device=device) for w in mats]
    best = float("inf")
    for _ in range(passes):
        _sync(device)
        start = time.perf_counter()
        for x, w in zip(xs, mats):
            F.linear(x, w)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def bench_quarter(
    folder: Path, prompts: list[list[int]], opts: Options, capacity: int
) -> dict[int, list[DecodeRun]]:
    with offload_rt.load(folder, device=opts.device, cache_experts=capacity) as ort:
        runner = {"quarter": ort_runner(ort)}
        return {
            b: measure(runner, prompts[:b], opts.steps, opts.repeats)["quarter"] for b in BATCHES
        }


def cache_counts(runs: list[DecodeRun]) -> str:
    total = {k: sum(r.cache[k] for r in runs if r.cache) for k in ("hits", "misses", "evictions")}
    uses = total["hits"] + total["misses"]
    rate = total["hits"] / uses if uses else 0.0
    return (
        f"hits {total['hits']}, misses {total['misses']}, evictions {total['evictions']} "
        f"(hit rate {rate:.0%}, over {len(runs)} timed runs)"
    )


def report(
    full: dict[int, dict[str, list[DecodeRun]]],
    quarter: dict[int, list[DecodeRun]],
    bound: float,
    capacity: int,
    total: int,
) -> None:
    print(
        f"\n{'batch':>5} {'transformers':>13} {'offload_rt':>11} {'ratio':>6}  "
        f"{'tf/bound':>8} {'ort/bound':>9}  {f'ort cache {capacity}/{total}':>18} "
        f"{'/bound':>7}"
    )
    for b in BATCHES:
        tf, ort = tokens_per_s(full[b]["transformers"]), tokens_per_s(full[b]["offload_rt"])
        q = tokens_per_s(quarter[b])
        print(
            f"{b:>5} {tf:>13.2f} {ort:>11.2f} {ort / tf:>5.2f}x  {tf / bound:>8.0%} "
            f"{ort / bound:>9.0%}  {q:>18.2f} {q / bound:>7.0%}"
        )
    print("(tokens/s, median of repeats; ratio = offload_rt / transformers)")
    for b in BATCHES:
        print(f"cache {capacity}/{total}, batch {b}: {cache_counts(quarter[b])}")
    tf1, ort1 = tokens_per_s(full[1]["transformers"]), tokens_per_s(full[1]["offload_rt"])
    print(
        f"\ntarget offload_rt >= 1.15x transformers at batch 1: {ort1 / tf1:.2f}x "
        f"-> {'met' if ort1 >= 1.15 * tf1 else 'NOT met'}"
    )
    print(
        f"target offload_rt >= 85% of bound at batch 1: {ort1 / bound:.0%} "
        f"-> {'met' if ort1 >= 0.85 * bound else 'NOT met'}"
    )


def check_tokens(full: dict[int, dict[str, list[DecodeRun]]]) -> None:
    for b in BATCHES:
        same = full[b]["transformers"][0].tokens == full[b]["offload_rt"][0].tokens
        print(f"batch {b}: greedy tokens of the two engines {'identical' if same else 'DIFFER'}")


def main() -> None:
    opts = parse_options()
    hf_logging.disable_progress_bar()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{opts.steps} decode steps after a {PROMPT_LEN}-token prompt, {opts.repeats} repeats; "
        f"load average {os.getloadavg()[0]:.2f} (other work on the machine skews every figure)"
    )
    folder = checkpoint(opts.workdir, opts.layers)
    cfg = read_config(folder)
    prompts = make_prompts(max(BATCHES), cfg.vocab_size)

    if opts.device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(opts.device)}")
    before = matvec_bandwidth(opts.device)
    full, replay = bench_full(folder, prompts, opts)
    capacity = cfg.num_experts_total // 4
    quarter = bench_quarter(folder, prompts, opts, capacity)
    after = matvec_bandwidth(opts.device)
    nbytes = token_bytes(cfg, itemsize=4)
    bound = max(before, after) / nbytes
    print(
        f"\nmatrix-vector bandwidth {before / 1e9:.2f} GB/s before the runs, "
        f"{after / 1e9:.2f} GB/s after; one batch-1 token reads {nbytes / MIB:.1f} MiB "
        f"of weights -> bound {bound:.2f} tokens/s (at the better bandwidth)"
    )
    print(
        f"the token's own matrix-vector products replayed back to back: "
        f"{replay * 1e3:.2f} ms ({nbytes / replay / 1e9:.2f} GB/s) -> replay bound "
        f"{1 / replay:.2f} tokens/s"
    )
    print(f"load average {os.getloadavg()[0]:.2f} at the end (this run adds about its threads)")
    check_tokens(full)
    report(full, quarter, bound, capacity, cfg.num_experts_total)
    ort1 = tokens_per_s(full[1]["offload_rt"])
    tf1 = tokens_per_s(full[1]["transformers"])
    print(
        f"batch 1 against the replay bound: offload_rt {ort1 * replay:.0%}, "
        f"transformers {tf1 * replay:.0%} (85% target: "
        f"{'met' if ort1 * replay >= 0.85 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
