"""One matrix's rows times a vector in C++, by weight format: the row loops of the one-row
layer (`model/rowlayer.py`), and what they read of a weight and of an expert.

Formats (`Rows`' B): a matrix of the activations' dtype (FLOAT), widened 16 values at a time
into float32 lanes; int8 affine codes (INT8, `experts/quant.py`'s layout, groups of a multiple
of 16 columns), widened to float32 lanes, x in float32, scaled per group, the offsets' term from
x's group sums; int4 codes the same way, both nibbles of 16 bytes at a time (INT4); int4 codes
with bfloat16 activations through `packed`'s row loop (INT4_BF16: bfloat16 dot products, x86
CPUs with AVX-512 BF16 only, `packed.cpu_supports`). AVX-512 and AVX2 intrinsics where the
compiler has them, GCC's generic vectors elsewhere; multiply-adds fused (`fma16`). Each output
row is one thread's float32 sum.
"""

from __future__ import annotations

import weakref

import torch

from offload_rt.model import packed
from offload_rt.model.ffn import SwiGLU

# the loops, after `native.PRELUDE` (`Rows`, `rows` and `dot_row` for the layer's C++)
LOOPS = (
    "#if defined(__x86_64__)\n"
    + packed.ROW
    + "#else\nnamespace {\n// never called: int4 plans need AVX-512 BF16 (`packed.cpu_supports`)\n"
    + "inline float row(const uint8_t*, const uint16_t*, const uint16_t*, const uint16_t*,\n"
    + "                 const float*, int64_t, int64_t) { return 0.f; }\n}\n#endif\n"
    + r"""
namespace {

typedef uint8_t u8x16 __attribute__((vector_size(16)));

// a * b + c in one rounding where the CPU has it (Inductor's flags keep GCC from contracting
// a * b + c: a multiply and an add a lane, which bound the loops' arithmetic: 6% of a float32
// step, 2.6% of a bfloat16 one, 3% of an int8 one, 11% of an int4 one with float32 activations)
inline v16 fma16(v16 a, v16 b, v16 c) {
#if defined(__AVX512F__)
    return (v16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
    return a * b + c;
#endif
}

// codes (16) widened to float32 lanes
inline v16 widen8(const uint8_t* p) {
#if defined(__AVX512F__)  // the compiler widens a generic vector of bytes one by one
    return (v16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
    const __m128i b = _mm_loadu_si128((const __m128i*)p);
    return join(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))));
#else
    u8x16 b;
    std::memcpy(&b, p, 16);
    return __builtin_convertvector(__builtin_convertvector(b, u32x16), v16);
#endif
}

// sum_g offsets[g] * xsum[g] over a row's ng groups: the affine codes' offsets' term
inline float offset_term(const _Float16* offsets, const float* xsum, int64_t ng) {
    v16 off = {};
    int64_t g = 0;
    for (; g + 16 <= ng; g += 16) off += F16::load(offsets + g) * F32::load(xsum + g);
    float sum = hsum(off);
    for (; g < ng; ++g) sum += F16::get(offsets[g]) * xsum[g];
    return sum;
}

// one row of int8 affine codes (K columns, groups of G, a multiple of 16; float16 scales and
// offsets) times x (K float32) with xsum (x's sum over each group):
// sum_g scales[g] * (codes of g . x) + sum_g offsets[g] * xsum[g]
inline float row8(const uint8_t* codes, const _Float16* scales, const _Float16* offsets,
                  const float* x, const float* xsum, int64_t K, int64_t G) {
    const int64_t ng = K / G;
    v16 all = {};
    for (int64_t g = 0; g < ng; ++g) {
        const uint8_t* c = codes + g * G;
        const float* xg = x + g * G;
        v16 a = {}, b = {};
        int64_t j = 0;
        for (; j + 32 <= G; j += 32) {
            __builtin_prefetch(c + j + 2048);  // as `packed.ROW`
            a = fma16(widen8(c + j), F32::load(xg + j), a);
            b = fma16(widen8(c + j + 16), F32::load(xg + j + 16), b);
        }
        if (j < G) a += widen8(c + j) * F32::load(xg + j);
        all += (a + b) * F16::get(scales[g]);
    }
    return hsum(all) + offset_term(offsets, xsum, ng);
}

// 16 bytes of int4 codes -> their low and high nibbles in float32 lanes
inline void widen4(const uint8_t* p, v16& lo, v16& hi) {
#if defined(__AVX512F__)
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    lo = (v16)_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    hi = (v16)_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
#elif defined(__AVX2__)
    const __m128i q = _mm_loadu_si128((const __m128i*)p);
    const __m128i m = _mm_set1_epi8(15);
    const __m128i l = _mm_and_si128(q, m), h = _mm_and_si128(_mm_srli_epi16(q, 4), m);
    lo = join(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(l)),
              _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(l, 8))));
    hi = join(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(h)),
              _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(h, 8))));
#else
    u8x16 b;
    std::memcpy(&b, p, 16);
    const u32x16 w = __builtin_convertvector(b, u32x16);
    lo = __builtin_convertvector(w & 15u, v16);
    hi = __builtin_convertvector(w >> 4, v16);
#endif
}

// one row of int4 affine codes (`experts/quant.py`: byte j holds column j in its low nibble,
// j + K/2 in its high one; groups of G columns, a multiple of 16, within a half) times x (K
// float32) with xsum, as row8: any CPU, any activation dtype (widened to float32)
inline float row4(const uint8_t* codes, const _Float16* scales, const _Float16* offsets,
                  const float* x, const float* xsum, int64_t K, int64_t G) {
    const int64_t half = K / 2, hg = half / G;
    v16 lo_all = {}, hi_all = {};
    for (int64_t g = 0; g < hg; ++g) {
        const uint8_t* c = codes + g * G;
        const float *xl = x + g * G, *xh = x + half + g * G;
        v16 lo = {}, hi = {};
        for (int64_t j = 0; j < G; j += 16) {
            __builtin_prefetch(c + j + 2048);
            v16 l, h;
            widen4(c + j, l, h);
            lo = fma16(l, F32::load(xl + j), lo);
            hi = fma16(h, F32::load(xh + j), hi);
        }
        lo_all += lo * F16::get(scales[g]);
        hi_all += hi * F16::get(scales[g + hg]);
    }
    return hsum(lo_all + hi_all) + offset_term(offsets, xsum, K / G);
}

}  // namespace

namespace {

// w (K) of dtype C . x (K) float32, in two vectors of float32 sums
template <class C>
inline float dot_row(const typename C::T* w, const float* x, int64_t K) {
    v16 a = {}, b = {};
    int64_t i = 0;
    for (; i + 32 <= K; i += 32) {
        a = fma16(C::load(w + i), F32::load(x + i), a);
        b = fma16(C::load(w + i + 16), F32::load(x + i + 16), b);
    }
    for (; i + 16 <= K; i += 16) a += C::load(w + i) * F32::load(x + i);
    float s = hsum(a + b);
    for (; i < K; ++i) s += C::get(w[i]) * x[i];
    return s;
}

// One matrix's rows times x (K) of dtype C, float32 sums, by the weights' format B: a matrix of
// dtype C (m[0]: (N, K)) where B == 0; affine codes in groups of G columns (m: codes, then
// float16 scales and offsets (N, K/G)): int8 (B 8, codes (N, K)), int4 (codes (N, K/2)) in
// float32 lanes (B 4) or through `packed`'s bfloat16 dot products (B 2: bfloat16 x, AVX-512
// BF16 only). xs: x widened (B 0), x's sums over each group (B 2), both (B 8, 4).
template <class C>
struct Rows {
    const int64_t* m;
    int64_t K, G, B;
    inline float operator()(int64_t n, const typename C::T* x, const float* xs) const {
        if (B == 0) return dot_row<C>((const typename C::T*)m[0] + n * K, xs, K);
        const int64_t ng = K / G;
        const _Float16 *s = (const _Float16*)m[1] + n * ng, *o = (const _Float16*)m[2] + n * ng;
        if (B == 8) return row8((const uint8_t*)m[0] + n * K, s, o, xs, xs + K, K, G);
        if (B == 4) return row4((const uint8_t*)m[0] + n * (K / 2), s, o, xs, xs + K, K, G);
        return row((const uint8_t*)m[0] + n * (K / 2), (const uint16_t*)m[1] + n * ng,
                   (const uint16_t*)m[2] + n * ng, (const uint16_t*)x, xs, K, G);
    }
    // what operator() takes as xs for this x
    std::vector<float> prepare(const typename C::T* x) const {
        const int64_t widened = B == 2 ? 0 : K;
        std::vector<float> xs(widened + (B == 0 ? 0 : K / G), 0.f);
        int64_t i = 0;
        for (; i + 16 <= widened; i += 16) F32::store(&xs[i], C::load(x + i));
        for (; i < widened; ++i) xs[i] = C::get(x[i]);
        for (int64_t g = 0; B != 0 && g < K / G; ++g) {  // G: a multiple of 16
            v16 sum = {};
            for (int64_t j = g * G; j < (g + 1) * G; j += 16) sum += C::load(x + j);
            xs[widened + g] = hsum(sum);
        }
        return xs;
    }
};

template <class C>
void rows(const typename C::T* x, const int64_t* m, int64_t N, int64_t K, int64_t G, int64_t B,
          typename C::T* y, int64_t threads) {
    const Rows<C> r{m, K, G, B};
    const std::vector<float> xs = r.prepare(x);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) y[n] = C::put(r(n, x, xs.data()));
}

}  // namespace
"""
)


def pointers(held: tuple[torch.Tensor | None, ...] | list[torch.Tensor | None]) -> list[int]:
    """The data pointers of what `matrix` holds, as the C++ tables take them (0 for None)."""
    return [t.data_ptr() if t is not None else 0 for t in held]


# a matrix's (format, group) for the C++ (`Rows`): the activations' dtype, int8 codes, int4 codes
# in float32 lanes, int4 codes through `packed`'s bfloat16 dot products
Form = tuple[int, int]
FLOAT, INT8, INT4, INT4_BF16 = 0, 8, 4, 2


def matrix(w: object, dtype: torch.dtype) -> tuple[tuple[torch.Tensor | None, ...], Form] | None:
    """What the C++ reads of a weight, and its form: a matrix of the activations' dtype, or
    int8 / int4 affine codes, scales and offsets in groups of a multiple of 16 columns (int4:
    within a half of the row), through `packed`'s row loop where it applies (bfloat16
    activations, AVX-512 BF16); else None."""
    if isinstance(w, torch.Tensor):
        if w.dtype != dtype or w.device.type != "cpu" or not w.is_contiguous():
            return None
        return (w, None, None), (FLOAT, 0)
    parts = w.affine()  # type: ignore[attr-defined]
    if parts is None:
        return None
    bits, codes, scales, offsets = parts
    k, groups = w.shape[1], scales.shape[1]  # type: ignore[attr-defined]
    if (
        any(t.device.type != "cpu" or not t.is_contiguous() for t in (codes, scales, offsets))
        or scales.dtype != torch.float16
        or offsets.dtype != torch.float16
        or k % groups
        or (k // groups) % 16
    ):
        return None
    held, group = (codes, scales, offsets), k // groups
    if bits == 8:
        return held, (INT8, group)
    if bits != 4 or groups % 2:  # int4: groups within each half
        return None
    if packed.fits(dtype, k, groups) and packed.available():
        return held, (INT4_BF16, group)
    return held, (INT4, group)


# an expert's pointers, form and width for a dtype, by its weights object (a slot's, kept while
# it lives)
_KINDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def expert_kind(ffn: object, dtype: torch.dtype) -> tuple[list[int], Form, int] | None:
    """A SwiGLU expert's six pointers (w13's and w2's, as `Rows`), its form and its width, as
    the row loops read it for activations of `dtype`; None where they do not take it."""
    if type(ffn) is not SwiGLU:  # GPT-OSS's clamped experts: not these loops
        return None
    if isinstance(ffn.w13, torch.Tensor):  # a float expert: cheap to look at, not kept
        return _kind_of(ffn, dtype)
    known = _KINDS.get(ffn)
    if known is None or known[0] != dtype:
        kind = _kind_of(ffn, dtype)
        if kind is None:
            return None
        known = _KINDS[ffn] = (dtype, kind)
    return known[1]


def _kind_of(ffn: SwiGLU, dtype: torch.dtype) -> tuple[list[int], Form, int] | None:
    parts = [matrix(ffn.w13, dtype), matrix(ffn.w2, dtype)]
    if parts[0] is None or parts[1] is None or parts[0][1] != parts[1][1]:
        return None
    return pointers([*parts[0][0], *parts[1][0]]), parts[0][1], ffn.w2.shape[1]  # type: ignore[index]
