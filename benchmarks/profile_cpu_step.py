"""Where a batch-1 CPU decode step's time goes: compiled kernels against everything else.

For bench_cpu's random Mixtral (bench_local's checkpoint; int8 / int4 experts with attention and
lm_head quantized alike, as bench_cpu runs them), generates --tokens tokens greedily and prints:
- the step time (ms per token);
- the compiled kernels' share, timed around each call inside the step, by kernel and shape;
- the same kernel calls of one token replayed back to back (no other work between them);
- the step split by part (the one-row path's compiled glue, cache write and attention (in
  C++ where `model/onequery.py` serves), the two calls of a layer in C++ where
  `model/rowlayer.py` serves, a whole step in one call where `model/rowstep.py` does,
  attention's products, routed experts, lm_head), each timed around its call, so the parts
  hold their own Python and torch overhead.
The timers cost about a microsecond a call.

Run from the repository root: `python benchmarks/profile_cpu_step.py int8 [--threads 2]`.
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from pathlib import Path

import bench_local
import bench_quant
import torch

import offload_rt
import offload_rt.model.decoder as decoder
from offload_rt.model import cpukernels, onequery, onerow, packed, rowlayer, rowstep

Timings = collections.defaultdict[str, float]


def timed(owner: object, name: str, label: str, acc: Timings, calls: list | None = None) -> None:
    """Replace owner.name by a wrapper adding its seconds to acc[label] (and its calls to
    `calls`, where given, for the replay)."""
    fn = getattr(owner, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        acc[label] += time.perf_counter() - start
        if calls is not None:
            calls.append((fn, args))
        return out

    setattr(owner, name, wrapper)


def timed_kernels(acc: Timings, calls: list[tuple[Callable, tuple]]) -> None:
    """Every compiled matrix-vector kernel so far timed by (function, weight shape), its calls
    recorded (the compiled glue of `model/onerow.py` is not a product: left out)."""
    for key, kernel in list(cpukernels.COMPILED.kernels.items()):
        if not key[0].endswith("_gemv"):
            continue
        label = f"{key[0]} {tuple(key[4][0])}"

        def wrapper(*args: torch.Tensor, _k: Callable = kernel, _l: str = label) -> torch.Tensor:
            start = time.perf_counter()
            out = _k(*args)
            acc[_l] += time.perf_counter() - start
            calls.append((_k, args))
            return out

        cpukernels.COMPILED.kernels[key] = wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", choices=["float32", "bfloat16", "float16", "int8", "int4"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/offload_rt_bench"))
    p.add_argument("--dtype", default="float32", help="activations with int8/int4 weights")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    folder = bench_local.checkpoint(a.workdir, bench_local.MODEL["num_hidden_layers"])
    if a.weights in ("int8", "int4"):
        quantized = bench_quant.quantized(folder, a.workdir, a.weights, 64)
        model = offload_rt.load(quantized, dtype=getattr(torch, a.dtype), dense_quant=a.weights)
    else:
        model = offload_rt.load(folder, dtype=getattr(torch, a.weights))
    n = a.tokens

    def step_ms() -> float:
        start = time.perf_counter()
        model.generate([1], max_new_tokens=n, stop=[])
        return (time.perf_counter() - start) / n * 1e3

    step_ms()  # compile, fault the weights in
    plain = step_ms()
    kernels: Timings = collections.defaultdict(float)
    calls: list[tuple[Callable, tuple]] = []
    timed_kernels(kernels, calls)
    timed(packed, "affine4_gemv", "packed.affine4_gemv (int4 x bfloat16)", kernels, calls)
    parts: Timings = collections.defaultdict(float)
    # the one-row path's parts (model/onerow.py) and what the decoder calls between them
    timed(onerow, "enter", "compiled: expert sum, residual, norm", parts)
    timed(onerow, "heads", "compiled: q/k/v heads and rotation", parts)
    timed(onerow, "leave", "compiled: residual, norm, router", parts)
    timed(decoder, "attend", "cache write and attention (torch)", parts)
    timed(onequery, "attend", "rotation, cache write and attention (C++)", parts)
    timed(rowlayer, "attend", "C++ layer, call 1: sum, norms, products, attention, router", parts)
    timed(rowlayer, "experts", "C++ layer, call 2: the chosen experts", parts)
    timed(rowstep, "token", "C++ step: every layer in one call (all experts resident)", parts)
    timed(decoder, "linear", "attention's products", parts)
    timed(model.model.backend, "run", "routed experts", parts)
    timed(decoder.MoEDecoder, "logits", "lm_head", parts)
    total = step_ms()
    in_kernels = sum(kernels.values()) / n * 1e3
    print(
        f"{a.weights}{f', {a.dtype} activations' if a.weights.startswith('int') else ''}, "
        f"{a.threads} threads: "
        f"step {plain:.2f} ms, timed {total:.2f} ms"
    )
    print(f"compiled kernels {in_kernels:.2f} ms ({in_kernels / total:.0%}):")
    for label, s in sorted(kernels.items(), key=lambda kv: -kv[1]):
        print(f"  {label}: {s / n * 1e3:.2f} ms")
    token = calls[-len(calls) // n :]
    start = time.perf_counter()
    for kernel, args in token:
        kernel(*args)
    replay = (time.perf_counter() - start) * 1e3
    print(f"one token's {len(token)} kernel calls replayed back to back: {replay:.2f} ms")
    print("by part:")
    for label, s in parts.items():
        print(f"  {label}: {s / n * 1e3:.2f} ms")
    model.close()


if __name__ == "__main__":
    main()
