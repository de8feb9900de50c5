"""One-row products on the CPU: the candidate kernels side by side, on an expert's matrices.

For w13 (2F, D) = (5632, 1024) of bench_local's model, times x (1, D) @ w^T with
- torch's eager `F.linear` (MKL / oneDNN underneath) in float32, bfloat16, float16;
- oneDNN directly (`torch.ops.mkldnn._linear_pointwise` on a reordered weight);
- torch's weight-only int8 kernel (`_weight_int8pack_mm`: int8 codes, one scale per row) and its
  int4 one (`_weight_int4pack_mm_for_cpu`: 4-bit codes in its own packing, a scale and zero per
  group of 64);
- this runtime's kernels (`offload_rt/model/cpukernels.py`, compiled by TorchInductor): float32,
  bfloat16, float16, and the affine int8 / int4 format of `experts/quant.py` (group 64).
Each candidate cycles over enough copies of its weights (--copies, 448 MB of float32) that they
stream from DRAM rather than the L3 cache, as a decode step's do; best of --passes passes.
Prints µs per product, GB/s of weight bytes, and the ratio to eager float32 `F.linear`.

Run from the repository root: `python benchmarks/bench_cpu_kernels.py [--threads N]`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from offload_rt.config import QuantConfig
from offload_rt.experts.quant import quantize
from offload_rt.model import cpukernels

N, K, G = 5632, 1024, 64


def best_us(fn: Callable[..., object], args: list[tuple], passes: int) -> float:
    for a in args[:2]:
        fn(*a)
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for a in args:
            fn(*a)
        best = min(best, (time.perf_counter() - start) / len(args))
    return best * 1e6


def candidates(copies: int) -> list[tuple[str, Callable[..., object], list[tuple], int]]:
    """(name, function, argument tuples, weight bytes per product)."""
    torch.manual_seed(0)
    x = torch.randn(1, K)
    ws = [torch.randn(N, K) / 32 for _ in range(copies)]
    out = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        wd = [w.to(dt) for w in ws]
        xd = x.to(dt)
        nbytes = N * K * dt.itemsize
        out.append((f"F.linear {dt}", F.linear, [(xd, w) for w in wd], nbytes))
        if dt != torch.float16:
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in wd]
            onednn = torch.ops.mkldnn._linear_pointwise
            args = [(xd, w, None, "none", [], "") for w in packed]
            out.append((f"oneDNN {dt}", onednn, args, nbytes))
        out.append((f"offload_rt {dt}", cpukernels.gemv, [(xd, w) for w in wd], nbytes))
    scales = [w.abs().amax(1) / 127 for w in ws]
    int8 = [(torch.round(w / s[:, None]).to(torch.int8), s) for w, s in zip(ws, scales)]
    args = [(x, q, s) for q, s in int8]
    out.append(("torch _weight_int8pack_mm", torch.ops.aten._weight_int8pack_mm, args, N * K))
    codes = [torch.randint(0, 16, (N, K), dtype=torch.int32) for _ in range(copies)]
    pack4 = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(c, 1) for c in codes]
    sz = torch.stack([torch.rand(K // G, N) / 100, torch.randn(K // G, N) / 10], -1)
    args = [(x, p, G, sz) for p in pack4]
    int4_bytes = N * K // 2 + sz.numel() * 4
    int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    out.append(("torch _weight_int4pack_mm_for_cpu", int4_mm, args, int4_bytes))
    for bits in (8, 4):
        qs = [quantize(w, QuantConfig(bits, G)) for w in ws]
        args = [(x, q.qweight, q.scales, q.offsets, bits) for q in qs]
        nbytes = N * K * bits // 8 + 2 * 2 * N * K // G
        out.append((f"offload_rt affine int{bits}", cpukernels.affine_gemv, args, nbytes))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--copies", type=int, default=20)
    p.add_argument("--passes", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cpukernels.MIN_NUMEL = 0
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next(
        (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln), "?"
    )
    print(f"CPU: {name}; {a.threads} threads; load average {os.getloadavg()}")
    rows = []
    for label, fn, args, nbytes in candidates(a.copies):
        us = best_us(fn, args, a.passes)
        rows.append((label, us, nbytes / us / 1e3))
    base = rows[0][1]
    print(f"(1, {K}) x ({N}, {K})^T, best of {a.passes} passes over {a.copies} copies each")
    print("| kernel | µs | GB/s of weights | speed against F.linear float32 |")
    print("|---|---|---|---|")
    for label, us, gbs in rows:
        print(f"| {label} | {us:.0f} | {gbs:.1f} | {base / us:.2f}x |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
