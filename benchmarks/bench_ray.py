"""The Ray expert backend against bare Ray round trips and against the local backend (issue 3).

All on one simulated 3-node cluster (`ray.cluster_utils.Cluster`: head + 2 workers, one CPU
each, as in tests/ray_helpers.py), in one run, each figure beside its baseline. Figures are
medians of round trips timed in 10 alternating rounds (so drifting load hits all alike).

1. Wire encoding. Hidden states (N, 4096) float32, N in 1, 4, 16, sent to a bare echo actor on
   a worker node and back, as one object: (a) the torch tensor itself (Ray pickles it), (b) a
   numpy array (pickle-5 buffers), (c) the wire message (`frames.pack_groups`, one bytes
   object), decoded and re-encoded by the actor and decoded again here, as the runtime does;
   (b) and (c) include the copy into a tensor that owns its memory; (d) the same bytes echoed
   with no encoding (the floor of (c)). Then as the runtime sends it: (e) = (c) cut into
   frames of at most `RayOptions.frame_bytes` (one Ray argument and return value each, under
   Ray's 100 KiB inline limit), and (f) its floor, those frames echoed.
2. Dispatch overhead of one MoE layer: `RayExpertBackend.run(groups)` at batch 1 (2 experts on
   2 actors, as the single-token path sends them) and batch 16 (a random top-2 routing over
   8 experts, 3 actors), against bare echo actors pinned to the same nodes, sent the very
   request frames the backend sends (same arguments, same num_returns), all in flight at once,
   one `ray.get`. `RayExpertBackend.run` both ways: `.remote()` calls (`compiled_graph=False`),
   and through the compiled graph over all 3 actors (each visited every call). Beside it, the
   same bytes as one object per actor (what a plain `.remote(bytes)` does: over 100 KiB it
   goes through the object store). The checkpoint is wide and thin:
   hidden 4096 (Mixtral's, so the bytes on the wire are real) and expert width 32, so compute
   is small; what there is, is subtracted. It is timed inside an actor: a twin of each expert
   actor (`ExpertActor` subclassed to time its `run` and the expert compute in it), same spec
   and node, called alike. Dispatch overhead ratio = (backend.run - compute of the slowest
   actor) / bare round trip; the target is <= 1.2x. The gap over the bare trip (compute left
   out) is split, exactly, into: what the compute costs beyond its own time (the twins asked
   to compute and echo the request, no decode or encode, less the bare trip and the compute:
   the cores and caches it takes from the Ray processes beside it), the actor's decode and
   encode (twins' run less that), the driver side (backend.run less the expert actors' run
   called directly with the same frames: grouping, encode, decode), and the twins against the
   real actors (noise). Encode and decode in this process are also timed alone.
3. Ray Compiled Graphs: the batch-1 layer call (2 experts on 2 actors) to the expert actors'
   `run` (InputNode -> one `run.bind` per actor -> MultiOutputNode, `experimental_compile`)
   against the normal `.remote()` calls with the same payloads, before and after the graph's
   teardown. Skipped with a message where compiling or running it fails.
4. Decode tokens/s of the ray backend (3 CPU actors, one per node) against the local backend
   (every expert resident in this process) at batch 1 and 16, greedy, decode steps only
   (prefill and a warm-up run untimed), alternating repeats, medians; greedy tokens of all
   runs compared. Random checkpoint: hidden 512, 4 layers, 8 experts, vocab 2000, fp32.

Note on 2-core machines: torch's OpenMP threads spin for a while after each parallel op (a
copy of 32768+ elements is one), taking a core from the Ray processes on the same cores. The
"driver at 1 torch thread" decode figures show how much of a gap that is.

Checkpoints are written once with `save_pretrained` into --workdir and reused. Every `ray.get`
has a timeout; Ray and the cluster are shut down at the end and no raylet may be left.
Figures with an object over Ray's 100 KiB inline limit (through the object store, about 10 ms
a trip here) take a third of the calls.

Run from the repository root: `python benchmarks/bench_ray.py` (about 2 minutes on 2 cores);
`--quick` runs few calls and steps as a smoke test. On a 2-core machine the driver, 3 raylets
and the actors share 2 cores: every Ray figure includes that oversubscription.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from bench_ray_common import (
    DECODE,
    DECODE_BATCHES,
    PROMPT_LEN,
    RAY_OPTIONS,
    WIDE,
    WIRE_ROWS,
    Options,
    checkpoint,
    framed,
    interleaved,
    node_with,
    parse_options,
    ray_get,
    scaled,
    shut_down,
    spawn_echo,
    start_cluster,
    submit,
    torch_threads,
)
from bench_ray_dispatch import bench_wide
from ray.actor import ActorHandle
from transformers.utils import logging as hf_logging

import offload_rt
from offload_rt import OffloadModel
from offload_rt.distributed.frames import decode_groups
from offload_rt.engine import BatchDecoder

# ---- 1. wire encoding


def wire_trips(echo: ActorHandle, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    fixed, cut = framed(x, 1), framed(x)

    def torch_trip() -> torch.Tensor:
        return ray_get(echo.echo.remote(x))

    def numpy_trip() -> torch.Tensor:
        return torch.from_numpy(np.array(ray_get(echo.echo.remote(x.numpy()))))

    def wire_trip(frames: int | None) -> Callable[[], object]:
        def trip() -> object:
            refs = submit(echo, "echo_wire", framed(x, frames))
            return decode_groups("response", ray_get(refs))

        return trip

    return {
        "torch": torch_trip,
        "numpy": numpy_trip,
        "wire": wire_trip(1),
        "bytes": lambda: ray_get(echo.echo.remote(fixed[0])),
        "wire_frames": wire_trip(None),
        "bytes_frames": lambda: ray_get(submit(echo, "echo", cut)),
    }


def bench_wire(opts: Options) -> dict[int, dict[str, float]]:
    echo = spawn_echo(node_with("node1"))
    try:
        out = {}
        for rows in WIRE_ROWS:
            x = torch.randn(rows, WIDE["hidden_size"])  # (N, D)
            out[rows] = interleaved(wire_trips(echo, x), scaled(opts.calls, x.nbytes))
        return out
    finally:
        ray.kill(echo)


def report_wire(figures: dict[int, dict[str, float]]) -> None:
    print("\n== 1. wire encoding: round trip to a bare echo actor on a worker node (µs) ==")
    print(
        f"{'shape':>10} {'KiB':>4} {'(a) torch':>10} {'(b) numpy':>10} {'(c) wire':>9} "
        f"{'c/a':>6} {'c/b':>6}  {'(d) bytes':>10}  {'(e) frames':>10} {'(f) bytes':>10}"
    )
    for rows, f in figures.items():
        kib = rows * WIDE["hidden_size"] * 4 // 1024
        print(
            f"{f'[{rows}, 4096]':>10} {kib:>4} {f['torch']:>10.0f} {f['numpy']:>10.0f} "
            f"{f['wire']:>9.0f} {f['wire'] / f['torch']:>5.2f}x {f['wire'] / f['numpy']:>5.2f}x  "
            f"{f['bytes']:>10.0f}  {f['wire_frames']:>10.0f} {f['bytes_frames']:>10.0f}"
        )
    print(
        "the runtime uses (e): wire messages (msgpack header + raw tensor bytes) in bytes "
        f"frames of at most {RAY_OPTIONS.frame_bytes // 1024} KiB (frames.py)"
    )


# ---- 4. decode


@dataclass(frozen=True)
class DecodeRun:
    tokens: list[list[int]]  # greedy tokens per row, decode steps only
    seconds: float  # wall time of the decode steps


Runner = Callable[[list[list[int]], int], DecodeRun]


def runner(model: OffloadModel) -> Runner:
    def run(prompts: list[list[int]], steps: int) -> DecodeRun:
        decoder = BatchDecoder(model.model, prompts, PROMPT_LEN + steps)
        logits = decoder.prefill()
        live = [True] * len(prompts)
        per_step: list[list[int]] = []
        start = time.perf_counter()
        for _ in range(steps):
            per_step.append(logits.argmax(-1).tolist())
            logits = decoder.step(per_step[-1], live)
        return DecodeRun([list(r) for r in zip(*per_step)], time.perf_counter() - start)

    return run


def remote_path_runner(model: OffloadModel) -> Runner:
    """The model's layer calls through `.remote()` calls, its compiled graph set aside."""
    run = runner(model)

    def run_remote(prompts: list[list[int]], steps: int) -> DecodeRun:
        graph, model.backend.graph = model.backend.graph, None
        try:
            return run(prompts, steps)
        finally:
            model.backend.graph = graph

    return run_remote


def on_one_thread_runner(run: Runner) -> Runner:
    def run_1t(prompts: list[list[int]], steps: int) -> DecodeRun:
        with torch_threads(1):
            return run(prompts, steps)

    return run_1t


def warm_all_experts(model: OffloadModel) -> None:
    """Every expert resident (`OffloadModel.warm`), or an error saying how many are not."""
    resident, total = model.warm(), model.config.num_experts_total
    if resident != total:
        raise RuntimeError(f"warm-up left {resident} of {total} experts resident")


def measure(
    runners: dict[str, Runner], prompts: list[list[int]], opts: Options
) -> dict[str, list[DecodeRun]]:
    """One untimed warm-up each, then `repeats` rounds in which every runner runs once."""
    for run in runners.values():
        run(prompts, min(opts.steps, 4))
    runs: dict[str, list[DecodeRun]] = {name: [] for name in runners}
    for _ in range(opts.repeats):
        for name, run in runners.items():
            runs[name].append(run(prompts, opts.steps))
    return runs


def bench_decode(folder: Path, opts: Options) -> dict[int, dict[str, list[DecodeRun]]]:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, DECODE["vocab_size"], (16, PROMPT_LEN), generator=g).tolist()
    with (
        offload_rt.load(folder) as local,
        offload_rt.load(folder, backend="ray", ray_options=RAY_OPTIONS) as remote,
    ):
        warm_all_experts(local)
        warm_all_experts(remote)
        ray_runner = runner(remote)
        runners = {
            "local": runner(local),
            "ray": ray_runner,
            "ray_1t": on_one_thread_runner(ray_runner),
            "ray_remote": remote_path_runner(remote),
        }
        return {b: measure(runners, prompts[:b], opts) for b in DECODE_BATCHES}


def tokens_per_s(runs: list[DecodeRun]) -> float:
    return statistics.median(len(r.tokens) * len(r.tokens[0]) / r.seconds for r in runs)


def report_decode(figures: dict[int, dict[str, list[DecodeRun]]], opts: Options) -> None:
    print(
        f"\n== 4. decode tokens/s, {opts.steps} steps, median of {opts.repeats}: ray (3 CPU "
        f"actors, 1 per node) vs local (this process, {torch.get_num_threads()} threads) =="
    )
    print(
        f"{'batch':>5} {'local':>8} {'ray':>8} {'ray/local':>9}  {'ray, driver 1t':>14} "
        f"{'/local':>7}  {'ray .remote()':>13} {'/local':>7}  {'ms/step local':>13} {'ray':>6} "
        f"{'ray/layer':>9}  tokens"
    )
    layers = DECODE["num_hidden_layers"]
    for b, runs in figures.items():
        tps = {name: tokens_per_s(r) for name, r in runs.items()}
        first = runs["local"][0].tokens
        same = all(r.tokens == first for rs in runs.values() for r in rs)
        ms_local, ms_ray = 1e3 * b / tps["local"], 1e3 * b / tps["ray"]
        print(
            f"{b:>5} {tps['local']:>8.1f} {tps['ray']:>8.1f} {tps['ray'] / tps['local']:>8.2f}x  "
            f"{tps['ray_1t']:>14.1f} {tps['ray_1t'] / tps['local']:>6.2f}x  "
            f"{tps['ray_remote']:>13.1f} {tps['ray_remote'] / tps['local']:>6.2f}x  "
            f"{ms_local:>13.2f} {ms_ray:>6.2f} {ms_ray / layers:>9.2f}  "
            f"{'identical' if same else 'DIFFER'}"
        )
    print(
        "(ray, ray driver 1t: compiled-graph path; ray .remote(): the same model with its graph "
        "set aside; ms per decode step of the compiled path; ray/layer: over its MoE layers)"
    )


# ---- main


def main() -> None:
    opts = parse_options()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    print(
        f"torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} cores; "
        f"{opts.calls} calls per figure; load average {os.getloadavg()[0]:.2f} "
        "(other work on the machine skews every figure)",
        flush=True,
    )
    wide, small = checkpoint(opts.workdir, WIDE), checkpoint(opts.workdir, DECODE)
    cluster = start_cluster()
    try:
        report_wire(bench_wire(opts))
        bench_wide(wide, opts)
        report_decode(bench_decode(small, opts), opts)
    finally:
        left = shut_down(cluster)
    print(f"\nRay processes left after shutdown: {left or 'none'}")
    print(
        f"load average {os.getloadavg()[0]:.2f} at the end; "
        f"total {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
