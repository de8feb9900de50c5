"""A hand-written one-row product of int4 affine codes with bfloat16 activations, for x86
CPUs with AVX-512 and its bfloat16 dot products (AMD Zen 4 and later, Intel Cooper Lake,
Sapphire Rapids and later), built at first use through Inductor's C++ toolchain.

The generated loop of `cpukernels._affine4_gemv` widens every nibble to float32 and multiplies
it there: about 5 vector operations per 16 weights, which bounds it at ~18 GB/s of codes on
this project's machine, short of what memory gives. With bfloat16 activations the nibbles can
stay 16 bits wide: 32 bytes of codes are zero-extended to 16-bit lanes, the low and high
nibbles split by a mask and a shift, each looked up as its exact bfloat16 value (`vpermw` on a
16-entry table), and multiplied by x with `vdpbf16ps`, which sums pairs of bfloat16 products
into float32 lanes: 7 operations per 64 weights. A bfloat16 times a small integer is exact in
float32, and the sums are float32, so the result is the dequantize-then-multiply product to
float32 rounding, then rounded once to bfloat16 as torch rounds:

    y[n] = sum_g scales[n, g] · (sum_{j in g} codes[n, j] · x[j]) + sum_g offsets[n, g] · xsum[g]

(the format of `experts/quant.py`: byte j of a row holds column j in its low nibble and column
j + K/2 in its high one; float16 scales and offsets per group of G columns). On this
project's machine: 123 µs for w13 (5632, 1024) on 2 threads against 190 for the generated
loop (`benchmarks/bench_cpu_kernels.py`). Hand-written float32 versions of the same loop
(AVX-512 and AVX2: bytes widened to int32, masked, shifted, converted) ran no faster than the
generated one, so float32 and float16 activations, and every other CPU, keep it.

Rows are split between OpenMP threads, each output one thread's sum (no dependence on the
thread count). The code is compiled with Inductor's compiler command and flags (its OpenMP,
so one thread pool serves both) and lands in its on-disk cache. Where the CPU lacks the
instructions, torch runs below AVX-512 (`ATEN_CPU_CAPABILITY`), the build fails, or
`OFFLOAD_RT_INT4_KERNEL=0`, the callers keep the generated kernel.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from offload_rt.model import native

# the row loop, shared with `model/rowlayer.py` (x86 only: callers check `cpu_supports`)
ROW = r"""
#include <immintrin.h>

#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")))

namespace {

// codes fetched this many bytes ahead of the loop (past a row's end: the next rows'): the
// hardware's prefetch alone left the loop at ~25 GB/s from memory, 28-31 with this (2-4 KiB
// equal, 0.5 KiB slower)
constexpr int64_t AHEAD = 2048;

// one row: sum_g scales[g] * (codes of group g . x) + sum_g offsets[g] * xsum[g]. The
// scales are widened 16 groups at a time, and the offsets' term is a vector sum: per-group
// scalar work bounded the loop on rows of many groups (w2: 44 groups, 1.4x slower)
TGT float row(const uint8_t* codes, const uint16_t* scales, const uint16_t* offsets,
              const uint16_t* x, const float* xsum, int64_t K, int64_t G) {
    const int64_t half = K / 2, hg = half / G;  // groups in a half: byte groups
    const __m512i mask = _mm512_set1_epi16(0x0f);
    // bfloat16 of 0..15, looked up by the nibble (vpermw reads the low 5 bits of each index)
    const __m512i table = _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130,
        0x4120, 0x4110, 0x4100, 0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0);
    __m512 off = _mm512_setzero_ps();
    for (int64_t g = 0; g < 2 * hg; g += 16) {
        const int64_t n = 2 * hg - g < 16 ? 2 * hg - g : 16;
        const __mmask16 m = __mmask16((1u << n) - 1);
        const __m512 o = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, offsets + g));
        off = _mm512_fmadd_ps(o, _mm512_maskz_loadu_ps(m, xsum + g), off);
    }
    __m512 lo_all = _mm512_setzero_ps(), hi_all = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < hg; g0 += 16) {
        const int64_t n = hg - g0 < 16 ? hg - g0 : 16;
        const __mmask16 m = __mmask16((1u << n) - 1);
        float sl[16], sh[16];
        _mm512_storeu_ps(sl, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, scales + g0)));
        _mm512_storeu_ps(sh, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, scales + hg + g0)));
        for (int64_t i = 0; i < n; ++i) {
            __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
            const int64_t base = (g0 + i) * G;
            for (int64_t c = 0; c < G; c += 32) {  // 32 bytes: 32 columns of each half
                _mm_prefetch((const char*)(codes + base + c + AHEAD), _MM_HINT_T0);
                const __m256i bytes = _mm256_loadu_si256((const __m256i*)(codes + base + c));
                const __m512i q = _mm512_cvtepu8_epi16(bytes);
                const __m512i l = _mm512_permutexvar_epi16(_mm512_and_si512(q, mask), table);
                const __m512i h = _mm512_permutexvar_epi16(_mm512_srli_epi16(q, 4), table);
                const __m512i xl = _mm512_loadu_si512(x + base + c);
                const __m512i xh = _mm512_loadu_si512(x + half + base + c);
                lo = _mm512_dpbf16_ps(lo, (__m512bh)l, (__m512bh)xl);
                hi = _mm512_dpbf16_ps(hi, (__m512bh)h, (__m512bh)xh);
            }
            lo_all = _mm512_fmadd_ps(lo, _mm512_set1_ps(sl[i]), lo_all);
            hi_all = _mm512_fmadd_ps(hi, _mm512_set1_ps(sh[i]), hi_all);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(lo_all, hi_all), off));
}

}  // namespace
"""

_SOURCE = (
    native.PRELUDE
    + ROW
    + r"""

// y (N) = x (K) times the int4 affine matrix: packed (N, K/2) codes, scales and offsets
// (N, K/G) float16; x and y bfloat16. K/2 a multiple of G, G of 32.
extern "C" void kernel(const uint16_t* x, const uint8_t* packed, const uint16_t* scales,
                       const uint16_t* offsets, uint16_t* y, int64_t N, int64_t K, int64_t G,
                       int64_t threads) {
    const int64_t ng = K / G, half = K / 2;
    std::vector<float> xsum(ng, 0.f);
    for (int64_t g = 0; g < ng; ++g)
        for (int64_t j = 0; j < G; ++j) xsum[g] += BF16::get(x[g * G + j]);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        y[n] = BF16::put(row(packed + n * half, scales + n * ng, offsets + n * ng, x,
                               xsum.data(), K, G));
}
"""
)

_ARGTYPES = ("const uint16_t*", "const uint8_t*", "const uint16_t*", "const uint16_t*")
_ARGTYPES += ("uint16_t*", "int64_t", "int64_t", "int64_t", "int64_t")
ENV = "OFFLOAD_RT_INT4_KERNEL"  # "0": the generated kernel of `cpukernels` instead


@functools.cache
def cpu_supports() -> bool:
    """AVX-512 with its bfloat16 dot products, and torch running its AVX-512 code (not forced
    lower by ATEN_CPU_CAPABILITY)."""
    return (
        torch.backends.cpu.get_cpu_capability() == "AVX512"
        and torch.cpu._is_avx512_bf16_supported()
    )


def _kernel() -> Callable[..., None] | None:
    return native.build("int4 bfloat16 kernel", _ARGTYPES, _SOURCE)


def available() -> bool:
    """Whether this CPU runs the kernel and it builds (built now if it was not yet)."""
    return cpu_supports() and _kernel() is not None


def applies(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether `affine4_gemv` serves x (1, K) against int4 codes with these scales: bfloat16
    activations on a CPU that has the instructions, groups of a multiple of 32 columns that
    do not span the two halves; not turned off by `ENV`."""
    return fits(x.dtype, x.shape[1], scales.shape[1])


def fits(dtype: torch.dtype, k: int, groups: int) -> bool:
    """`applies` for activations of this dtype and a matrix of k input columns in `groups`
    groups a row."""
    if dtype != torch.bfloat16 or groups % 2 or k % groups or (k // groups) % 32:
        return False
    return os.environ.get(ENV, "1") != "0" and cpu_supports()


def affine4_gemv(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor | None:
    """x (1, K) bfloat16 times the int4 affine matrix of `experts/quant.py` -> (1, N)
    bfloat16, on `torch.get_num_threads()` threads; None where the kernel cannot be built
    (the generated one serves). The caller has checked `applies`."""
    kernel = _kernel()
    if kernel is None:
        return None
    n, k = scales.shape[0], x.shape[1]
    x = x.contiguous()
    y = torch.empty((1, n), dtype=torch.bfloat16)
    kernel(x, packed, scales, offsets, y, n, k, k // scales.shape[1], torch.get_num_threads())
    return y
