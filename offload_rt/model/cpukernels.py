"""Matrix-vector products for one token on the CPU, generated and compiled by TorchInductor.

At batch 1 a decode step is matrix-vector products, bound by how fast the weights stream from
memory. torch's eager kernels stream them slowly on these shapes: MKL's float32 `F.linear`
reaches about half of llama.cpp's speed on an AMD EPYC, and bfloat16 a quarter (measured in
`benchmarks/bench_cpu.py`). The kernels here are written as plain tensor expressions (widen,
multiply, sum) that Inductor turns into one fused, vectorized C++ loop per product, parallel
over output rows, for the CPU's own vector ISA (AVX-512, AVX2, or scalar code; the
`ATEN_CPU_CAPABILITY` variable forces one). Quantized weights are read as their codes, never
widened into a float copy:

    affine int8/int4 (`experts/quant.py`), K inputs in groups of G:
    y[n] = sum_g scales[n, g] · (sum_{j in g} codes[n, j] · x[j]) + sum_g offsets[n, g] · xsum[g]
    where xsum[g] is the sum of x over group g, so each weight costs one widening and a
    multiply-add, each vector of a group's sum a multiply, and each row one horizontal sum;
    MXFP4 (`experts/mxfp4.py`): y[n] = sum_g 2^(e[n, g] - 127) · sum_{j in g} fp4(code) · x[j],
    the e2m1 value decoded by arithmetic in registers;
    FP8 (DeepSeek's block-scaled e4m3): y[n] = sum_blocks scale_inv · sum_j w[n, j] · x[j].

Each kernel is traced once per shape, dtype and thread count (`make_fx`) and compiled with
`torch._inductor.compile`, which calls it with no guards to check (about 5 µs a call against
20 µs through `torch.compile`); the generated code is then called past AOTAutograd's wrappers
where its first call shows that changes nothing (`_Direct`). Inductor keeps its compiled code
on disk, so a second process compiles in a fraction of the first one's time. Where a kernel
cannot be built (no C++ compiler, or any compile error) the callers' eager path runs instead,
after one warning; `OFFLOAD_RT_CPU_KERNELS=0` turns the kernels off.

Each output is one thread's sum, so results do not depend on the thread count; they are not
bit-identical to MKL's (another summation order): they agree to float rounding.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable

import torch

from offload_rt.model import packed

log = logging.getLogger(__name__)

ENV = "OFFLOAD_RT_CPU_KERNELS"  # "0" turns the compiled kernels off
MIN_NUMEL = 1 << 20  # smaller products keep torch's eager kernels: a call costs ~5 µs
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float weights whose one-row product stays with torch's F.linear, by torch's CPU capability:
# MKL's float16 kernel streams at memory speed on AVX-512 (as ours), its bfloat16 and float32
# ones at half of it (benchmarks/bench_cpu_kernels.py)
EAGER_AS_FAST = {"AVX512": (torch.float16,)}

Kernel = Callable[..., torch.Tensor]


def _float_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (1, K), w (N, K) of one float dtype -> (1, N), summed in float32."""
    return (x.float() * w.float()).sum(-1).to(x.dtype)[None]


def _offset_sums(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """sum_g offsets[n, g] · (x summed over group g): (N,)."""
    groups = offsets.shape[1]
    return (offsets.float() * x.float().view(groups, -1).sum(-1)).sum(-1)


def _split(group: int) -> int:
    """Into how many interleaved parts a group's products are summed before its scale: parts
    of 16 or more columns (a vector register of float32 on AVX-512), at most 4."""
    return max((s for s in (4, 2, 1) if group % (16 * s) == 0), default=1)


def _affine8_gemv(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """x (1, K); codes (N, K) uint8; scales, offsets (N, K / G) -> (1, N). A group's G
    columns in S parts side by side: each loop step multiplies S vectors of codes by their x,
    adds them, scales the sum once and adds it to the row's one accumulator (a sum per group
    would end each group in a horizontal reduction; one part a step chains every multiply-add
    on that accumulator: 1.1-1.2x slower at 8 bits, measured on AVX-512)."""
    n, groups = scales.shape
    g = x.shape[1] // groups
    s = _split(g)
    c = codes.view(n, groups, s, g // s).float()
    xg = x.float().view(1, groups, s, g // s)
    part = c[:, :, 0] * xg[:, :, 0]
    for r in range(1, s):
        part = part + c[:, :, r] * xg[:, :, r]  # (N, n, G / S)
    y = (part * scales.float()[..., None]).sum((1, 2))
    return (y + _offset_sums(x, offsets)).to(x.dtype)[None]


def _affine4_gemv(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """x (1, K); packed (N, K / 2) uint8 (column j in byte j's low nibble, column j + K/2 in
    its high one); scales, offsets (N, K / G) -> (1, N). Both nibbles of a byte in one loop,
    in S parts a step, as `_affine8_gemv`. The nibbles are split in float32 (high =
    floor(byte / 16), low = byte - 16 high, both exact): the vector ISAs have no 8-bit shift,
    and Inductor emulates one with a dozen shuffles."""
    n, groups = scales.shape
    half, g = groups // 2, x.shape[1] // groups
    s = _split(g)
    byte = packed.view(n, half, s, g // s).float()  # (N, n/2, S, G/S)
    high = torch.floor(byte * 0.0625)
    low = byte - 16 * high
    xg = x.float().view(2, half, s, g // s)  # the row's two halves
    lo, hi = low[:, :, 0] * xg[0, :, 0], high[:, :, 0] * xg[1, :, 0]
    for r in range(1, s):
        lo = lo + low[:, :, r] * xg[0, :, r]
        hi = hi + high[:, :, r] * xg[1, :, r]
    sc = scales.float().view(n, 2, half, 1)
    y = (lo * sc[:, 0] + hi * sc[:, 1]).sum((1, 2))
    return (y + _offset_sums(x, offsets)).to(x.dtype)[None]


def _fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8, < 16) -> their values in float32, by arithmetic (no table gather):
    sign bit 3, exponent bits 2-1, mantissa bit 0; exponent 0 is subnormal (0 or 0.5)."""
    exponent, mantissa = (codes >> 1) & 3, (codes & 1).float()
    normal = (1 + 0.5 * mantissa) * torch.exp2(exponent.float() - 1)
    magnitude = torch.where(exponent == 0, 0.5 * mantissa, normal)
    return torch.where(codes >= 8, -magnitude, magnitude)


def _mxfp4_gemv(
    x_even: torch.Tensor, x_odd: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """x's even and odd columns, each (1, K / 2); blocks (N, K / 32, 16) uint8 (a byte: column
    2k in its low nibble, 2k + 1 in its high one); scales (N, K / 32) e8m0 -> (1, N)."""
    n, groups, pairs = blocks.shape
    even, odd = x_even.float().view(1, groups, pairs), x_odd.float().view(1, groups, pairs)
    low, high = _fp4_values(blocks & 15), _fp4_values(blocks >> 4)  # (N, n, 16)
    dots = (low * even + high * odd).sum(-1)  # (N, n)
    y = (dots * torch.exp2(scales.float() - 127)).sum(-1)
    return y.to(x_even.dtype)[None]


def _fp8_gemv(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x (1, K); w (N, K) float8 e4m3; scale_inv (N / R, K / C) float32, one per block of R rows
    and C columns -> (1, N)."""
    (n, k), (rb, cb) = w.shape, scale_inv.shape
    dots = (w.float().view(n, cb, k // cb) * x.float().view(1, cb, -1)).sum(-1)  # (N, K / C)
    scale = scale_inv[:, None, :].expand(rb, n // rb, cb).reshape(n, cb)
    return (dots * scale).sum(-1).to(x.dtype)[None]


class _Compiled:
    """The compiled kernels of this process, by kernel, shapes, dtypes and thread count."""

    def __init__(self) -> None:
        self.kernels: dict[tuple, Kernel] = {}
        self._lock = threading.Lock()
        self.failed: str | None = None  # why compiling is off for this process

    def enabled(self) -> bool:
        return self.failed is None and os.environ.get(ENV, "1") != "0"

    def get(
        self,
        fn: Callable[..., object],
        args: tuple[torch.Tensor, ...],
        static: tuple = (),
        threads: int | None = None,
    ) -> Kernel | None:
        """fn(*static, *args) compiled for args' shapes and dtypes (static: hashable
        settings that shape the computation, fixed in the compiled code) to run on `threads`
        threads (default: torch's number now)."""
        threads = torch.get_num_threads() if threads is None else threads
        shapes = tuple((a.shape, a.dtype) for a in args)
        key = (fn.__name__, threads, static) + shapes
        kernel = self.kernels.get(key)
        if kernel is not None:
            return kernel
        with self._lock:
            if key not in self.kernels and self.failed is None:
                try:
                    self.kernels[key] = _compile(functools.partial(fn, *static), args, threads)
                except Exception as e:  # no compiler, or Inductor could not build it
                    self.failed = f"{type(e).__name__}: {e}"
                    log.warning("CPU kernels off, eager kernels instead: %s", self.failed)
        return self.kernels.get(key)


def _compile(fn: Callable[..., object], args: tuple[torch.Tensor, ...], threads: int) -> Kernel:
    from torch._inductor import compile as inductor_compile
    from torch._inductor import config as inductor_config
    from torch.fx.experimental.proxy_tensor import make_fx

    # multiply-adds fused (one rounding fewer): 5-8% faster int8/int4 kernels
    fma = {"cpp.enable_floating_point_contract_flag": "fast", "emulate_precision_casts": True}
    before = torch.get_num_threads()  # Inductor writes the thread count into the code
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(False), inductor_config.patch(fma):
            examples = [torch.zeros(a.shape, dtype=a.dtype) for a in args]
            graph = make_fx(fn, decomposition_table=_SMALL_PRODUCTS)(*examples)
            return _Direct(inductor_compile(graph, examples))
    finally:
        torch.set_num_threads(before)


class _Direct:
    """Inductor's generated code called without AOTAutograd's runtime wrappers around it
    (about 3.5 µs a call, a tenth of a small kernel's time), where that gives what they give:
    on the first call both run, and the direct one stays only if its outputs equal the
    wrapped one's (values, shapes, strides), none lies in an input's memory, and the graph
    mutates no input; else the wrapped callable serves every call."""

    def __init__(self, compiled: Kernel) -> None:
        self.compiled = compiled
        self.inner = getattr(compiled, "current_callable", None)
        usable = self.inner is not None and not getattr(compiled, "mutated_inputs", None)
        self.fn: Kernel = self._first if usable else compiled

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)

    def _first(self, *args: torch.Tensor) -> torch.Tensor:
        want = self.compiled(*args)
        self.fn = self.compiled
        single = isinstance(want, torch.Tensor)
        wanted = (want,) if single else tuple(want)
        inner = self.inner
        assert inner is not None
        try:
            got = tuple(inner(list(args)))
        except Exception:  # a calling convention other than the one this expects
            return want
        inputs = {a.untyped_storage().data_ptr() for a in args}
        same = len(got) == len(wanted) and all(
            isinstance(g, torch.Tensor)
            and g.dtype == w.dtype
            and g.shape == w.shape
            and g.stride() == w.stride()
            and torch.equal(g, w)
            and g.untyped_storage().data_ptr() not in inputs
            for g, w in zip(got, wanted)
        )
        if same and single:
            self.fn = lambda *a: inner(list(a))[0]
        elif same:
            self.fn = lambda *a: tuple(inner(list(a)))
        return want


COMPILED = _Compiled()


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, :, None] * b[None]).sum(1)


def _addmm(
    c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1, alpha: float = 1
) -> torch.Tensor:
    return beta * c + alpha * _mm(a, b)


# products inside a traced function (the kernels here have none; the one-row glue's router
# has one) as multiply-and-sum loops in the compiled code instead of calls to MKL's GEMM,
# whose fixed cost (~14 µs) is far above a (1, D) x (D, E) product's work
_SMALL_PRODUCTS = {torch.ops.aten.mm.default: _mm, torch.ops.aten.addmm.default: _addmm}


def _applies(x: torch.Tensor, numel: int) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 2
        and x.shape[0] == 1
        and numel >= MIN_NUMEL
        and x.dtype in DTYPES
        and COMPILED.enabled()
    )


@functools.cache
def _eager_as_fast(dtype: torch.dtype) -> bool:
    return dtype in EAGER_AS_FAST.get(torch.backends.cpu.get_cpu_capability(), ())


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x (1, K) @ w (N, K)^T with a compiled kernel; None where none applies (not the CPU,
    more rows, a small or non-contiguous matrix, other dtypes, kernels off) or where torch's
    own kernel is as fast on this CPU (`EAGER_AS_FAST`)."""
    if not _applies(x, w.numel()) or w.dtype != x.dtype or not w.is_contiguous():
        return None
    if _eager_as_fast(x.dtype):
        return None
    kernel = COMPILED.get(_float_gemv, (x, w))
    return None if kernel is None else kernel(x.contiguous(), w)


def affine_gemv(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int
) -> torch.Tensor | None:
    """x (1, K) times an affine int8/int4 matrix read as its codes (the format of
    `experts/quant.py`); None where no compiled kernel applies."""
    if not _applies(x, scales.shape[0] * x.shape[1]) or (bits == 4 and scales.shape[1] % 2):
        return None  # int4 with an odd number of groups: a group would span both nibbles
    if bits == 4 and packed.applies(x, scales):
        y = packed.affine4_gemv(x, codes, scales, offsets)  # hand-written: `model/packed.py`
        if y is not None:
            return y
    fn = _affine4_gemv if bits == 4 else _affine8_gemv
    kernel = COMPILED.get(fn, (x, codes, scales, offsets))
    return None if kernel is None else kernel(x.contiguous(), codes, scales, offsets)


def mxfp4_gemv(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x (1, K) times an MXFP4 matrix read as its codes (`experts/mxfp4.py`); None where no
    compiled kernel applies."""
    if not _applies(x, scales.shape[0] * x.shape[1]):
        return None
    x_even, x_odd = x[:, 0::2].contiguous(), x[:, 1::2].contiguous()
    kernel = COMPILED.get(_mxfp4_gemv, (x_even, x_odd, blocks, scales))
    return None if kernel is None else kernel(x_even, x_odd, blocks, scales)


def fp8_gemv(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor | None:
    """x (1, K) times a block-scaled float8 matrix read as stored (DeepSeek's FP8); None where
    no compiled kernel applies."""
    if not _applies(x, w.numel()):
        return None
    kernel = COMPILED.get(_fp8_gemv, (x, w, scale_inv))
    return None if kernel is None else kernel(x.contiguous(), w, scale_inv)
