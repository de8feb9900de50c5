"""One-row products on the CPU: the candidate kernels side by side, on an expert's matrices.

For w13 (2F, D) = (5632, 1024) of bench_local's model, times x (1, D) @ w^T with
- torch's eager `F.linear` (MKL / oneDNN underneath) in float32, bfloat16, float16;
- oneDNN directly (`torch.ops.mkldnn._linear_pointwise` on a reordered weight);
- torch's weight-only int8 kernel (`_weight_int8pack_mm`: int8 codes, one scale per row) and its
  int4 one (`_weight_int4pack_mm_for_cpu`: 4-bit codes in its own packing, a scale and zero per
  group of 64);
- this runtime's kernels (`offload_rt/model/cpukernels.py`, compiled by TorchInductor): float32,
  bfloat16, float16, and the affine int8 / int4 format of `experts/quant.py` (group 64; int4
  through the hand-written loop of `model/packed.py`, in float32 and bfloat16 activations, and
  through Inductor's generated one);
- formulations of the int8 / int4 kernels that lost, compiled the same way: a sum per group of
  64 then the scales (a horizontal reduction per group), int8 dequantized in registers then
  one dot a row, int4's nibbles split by an 8-bit vector shift or after widening to int32,
  and int8 bytes read as int32 words (four codes a word, x permuted to match).
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


def per_group8(x, codes, scales, offsets):  # noqa: ANN001, ANN201
    """int8: a sum per group of G, then its scale."""
    n, groups = scales.shape
    dots = (codes.float().view(n, groups, -1) * x.float().view(1, groups, -1)).sum(-1)
    return ((dots * scales.float()).sum(-1) + cpukernels._offset_sums(x, offsets))[None]


def per_group4(x, packed, scales, offsets):  # noqa: ANN001, ANN201
    """int4: a sum per group of G for each nibble (split by 8-bit shifts), then the scales."""
    n, groups = scales.shape
    half = groups // 2
    xg = x.float().view(2, half, -1)
    low = ((packed & 15).float().view(n, half, -1) * xg[0]).sum(-1)
    high = ((packed >> 4).float().view(n, half, -1) * xg[1]).sum(-1)
    dots = torch.cat([low, high], dim=-1)
    return ((dots * scales.float()).sum(-1) + cpukernels._offset_sums(x, offsets))[None]


def shifted4(x, packed, scales, offsets):  # noqa: ANN001, ANN201
    """int4: one sum a row, as the runtime's, but the nibbles split by 8-bit vector shifts."""
    n, groups = scales.shape
    half = groups // 2
    codes = packed.view(n, half, -1)
    xg, s = x.float().view(2, half, -1), scales.float().view(n, 2, half, 1)
    y = (codes & 15).float() * xg[0] * s[:, 0] + (codes >> 4).float() * xg[1] * s[:, 1]
    return (y.sum((1, 2)) + cpukernels._offset_sums(x, offsets))[None]


def dequantized8(x, codes, scales, offsets):  # noqa: ANN001, ANN201
    """int8: each weight dequantized in registers (code · scale + offset), one dot a row."""
    n, groups = scales.shape
    w = codes.float().view(n, groups, -1) * scales.float()[..., None] + offsets.float()[..., None]
    return (w * x.float().view(1, groups, -1)).sum((1, 2))[None]


def int32_split4(x, packed, scales, offsets):  # noqa: ANN001, ANN201
    """int4: one sum a row, the nibbles split after widening the bytes to int32."""
    n, groups = scales.shape
    half = groups // 2
    codes = packed.view(n, half, -1).to(torch.int32)
    xg, s = x.float().view(2, half, -1), scales.float().view(n, 2, half, 1)
    y = (codes & 15).float() * xg[0] * s[:, 0] + (codes >> 4).float() * xg[1] * s[:, 1]
    return (y.sum((1, 2)) + cpukernels._offset_sums(x, offsets))[None]


def words8(xw, codes, scales, offsets):  # noqa: ANN001, ANN201
    """int8 codes read as int32 words; xw (4, K / 4) holds x[4w + b] at [b, w]."""
    n, groups = scales.shape
    words, xv = codes.view(torch.int32).view(n, groups, 16), xw.view(4, groups, 16)
    acc = sum(((words >> (8 * b)) & 255).float() * xv[b] for b in range(4))
    xsum = xv.sum((0, 2))
    return ((acc * scales.float()[..., None]).sum((1, 2)) + (offsets.float() * xsum).sum(-1))[None]


def permuted(fn: Callable[..., torch.Tensor], args: tuple) -> Callable[..., torch.Tensor]:
    """`fn` compiled for x permuted into (4, K / 4) words order, and that permutation."""
    kernel = compiled(fn, (args[0].view(-1, 4).t().contiguous(),) + args[1:])
    return lambda x, *rest: kernel(x.view(-1, 4).t().contiguous(), *rest)


def compiled(fn: Callable[..., torch.Tensor], args: tuple) -> Callable[..., torch.Tensor]:
    return cpukernels._compile(fn, args, torch.get_num_threads())


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
        kernel = compiled(cpukernels._float_gemv, (xd, wd[0]))  # also where gemv keeps F.linear
        out.append((f"offload_rt {dt}", kernel, [(xd, w) for w in wd], nbytes))
    scales = [w.abs().amax(1) / 127 for w in ws]
    int8 = [(torch.round(w / s[:, None]).to(torch.int8), s) for w, s in zip(ws, scales)]
    for dt in (torch.float32, torch.bfloat16):  # its fast path wants bfloat16 activations
        args = [(x.to(dt), q, s.to(dt)) for q, s in int8]
        int8_mm = torch.ops.aten._weight_int8pack_mm
        out.append((f"torch _weight_int8pack_mm, x {dt}", int8_mm, args, N * K))
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
        args_4 = [a[:4] for a in args]
        alts = [("a sum per group", per_group8 if bits == 8 else per_group4)]
        if bits == 8:
            alts += [("dequantized in registers, one dot a row", dequantized8)]
        else:
            alts += [("nibbles by 8-bit shifts", shifted4), ("nibbles in int32", int32_split4)]
            alts += [("Inductor's loop (cpukernels._affine4_gemv)", cpukernels._affine4_gemv)]
            xb = x.to(torch.bfloat16)
            label = "offload_rt affine int4, x bfloat16"
            out.append((label, cpukernels.affine_gemv, [(xb, *a[1:]) for a in args], nbytes))
        for label, fn in alts:
            kernel = compiled(fn, args[0][:4])
            out.append((f"int{bits}: {label}", kernel, args_4, nbytes))
        if bits == 8:
            out.append(("int8: int32 words", permuted(words8, args[0][:4]), args_4, nbytes))
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
