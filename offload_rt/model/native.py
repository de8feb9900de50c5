"""C++ for the CPU decode step, built at first use through Inductor's C++ toolchain.

Inductor's `CppPythonBindingsCodeCache` compiles a C++ source with the compiler command and
flags it uses for its own kernels (its OpenMP, so one thread pool serves both), keeps the
library in its on-disk cache and binds one `extern "C" void kernel(...)` function to Python:
tensors are passed as pointers to their data, integers as int64_t, floats as float. Where a
source cannot be built (no compiler, or one without what the source needs) `build` returns
None after one warning, and the caller keeps its torch path.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# what the sources share: 16 float32 lanes and loads that widen each dtype into them
PRELUDE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

// 16 float32 lanes in GCC's generic vectors: one AVX-512 register, two AVX2 ones, four SSE
// or NEON ones (Inductor's flags turn the loop vectorizer off; these need none)
typedef float v16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef _Float16 h16x16 __attribute__((vector_size(32)));

#if defined(__AVX__)
// two 8-lane AVX registers as one v16
inline v16 join(__m256 lo, __m256 hi) {
    v16 r;
    std::memcpy(&r, &lo, 32);
    std::memcpy((char*)&r + 32, &hi, 32);
    return r;
}
#endif

struct F32 {
    using T = float;
    static inline float get(T v) { return v; }
    static inline T put(float f) { return f; }
    static inline v16 load(const T* p) {
        v16 r;
        std::memcpy(&r, p, 64);
        return r;
    }
    static inline void store(T* p, v16 f) { std::memcpy(p, &f, 64); }  // 16 puts
};

struct BF16 {
    using T = uint16_t;
    static inline float get(T v) {
        uint32_t u = uint32_t(v) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    static inline T put(float f) {  // round to nearest even, as torch; NaN stays NaN
        uint32_t u;
        std::memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
        u += 0x7fffu + ((u >> 16) & 1u);
        return T(u >> 16);
    }
    static inline v16 load(const T* p) {
        u16x16 h;
        std::memcpy(&h, p, 32);
        u32x16 w = __builtin_convertvector(h, u32x16) << 16;
        v16 r;
        std::memcpy(&r, &w, 64);
        return r;
    }
    static inline void store(T* p, v16 f) {  // 16 puts
        u32x16 u;
        std::memcpy(&u, &f, 64);
        u32x16 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        r = (u & 0x7fffffffu) > 0x7f800000u ? u32x16{} + 0x7fc0u : r;
        const u16x16 h = __builtin_convertvector(r, u16x16);
        std::memcpy(p, &h, 32);
    }
};

struct F16 {
    using T = _Float16;
    static inline float get(T v) { return float(v); }
    static inline T put(float f) { return T(f); }
    static inline v16 load(const T* p) {
#if defined(__AVX512F__)  // the compiler converts a generic vector of _Float16 one by one
        return (v16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#elif defined(__F16C__)
        const __m128i* q = (const __m128i*)p;
        return join(_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1)));
#else
        h16x16 h;
        std::memcpy(&h, p, 32);
        return __builtin_convertvector(h, v16);
#endif
    }
    static inline void store(T* p, v16 f) {  // 16 puts
#if defined(__AVX512F__)
        _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph((__m512)f, _MM_FROUND_TO_NEAREST_INT));
#else
        for (int i = 0; i < 16; ++i) p[i] = T(f[i]);
#endif
    }
};

// v rounded through dtype C and back (16 puts and gets)
template <class C>
inline v16 rounded(v16 v) {
    typename C::T t[16];
    C::store(t, v);
    return C::load(t);
}

inline float hsum(v16 v) {
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}

typedef int32_t i32x16 __attribute__((vector_size(64)));

// e^x, 16 lanes at once (glibc's expf is one value a call): x = n ln2 + r, |r| <= ln2 / 2,
// e^r by Cephes' expf polynomial (within 2 ulp), times 2^n built in the exponent bits; x
// clamped to [-87, 88] (e^-87 for less, e^88 for more: float32's range)
inline v16 exp16(v16 x) {
    x = x < -87.f ? v16{} - 87.f : x;
    x = x > 88.f ? v16{} + 88.f : x;
    const v16 t = x * 1.44269504088896341f + 0.5f;
    i32x16 n = __builtin_convertvector(t, i32x16);  // toward zero: floor for t < 0 below
    n += (i32x16)(t < __builtin_convertvector(n, v16));
    const v16 nf = __builtin_convertvector(n, v16);
    const v16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    v16 y = 1.9875691500e-4f + v16{};
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.f;
    const i32x16 bits = (n + 127) << 23;
    v16 scale;
    std::memcpy(&scale, &bits, 64);
    return y * scale;
}

}  // namespace
"""

_lock = threading.Lock()

# the dtype codes the sources switch on: PRELUDE's F32, BF16, F16
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.cache
def build(name: str, argtypes: tuple[str, ...], source: str) -> Callable[..., None] | None:
    """The bound `kernel` of `source` (argtypes: its parameters' C types), built once per
    process; None where it does not build. `name` labels the warning."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    with _lock:
        try:
            return CppPythonBindingsCodeCache.load_pybinding(list(argtypes), source)
        except Exception as e:  # no compiler, or one too old for the source
            log.warning("%s off, the torch path instead: %s", name, e)
            return None
