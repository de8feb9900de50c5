"""One query's attention on the CPU in C++: a batch-1 decode step's keys rotated and written
into the cache, and its query heads over the layer's keys, in one call.

In torch these are some fifteen operations a layer (the q and k rotation, two cache writes,
slicing the cache, widening 16-bit keys and values to float32, the attention kernel, the
output's reshape): 80-100 µs a layer for a few microseconds of arithmetic at short contexts,
most of a millisecond of an 8-layer step. Here one call does it, reading the cache in its own
dtype (float32, bfloat16 or float16):

- q and k rotated (Llama's `x * cos + rotate_half(x) * sin` over the first Hr dimensions of a
  head, the tables' width: GLM rotates part of the head) in float32 and rounded once to the
  model's dtype, as the compiled glue of `model/onerow.py` rounds them; k and v go into the
  cache at the step's position;
- each query head dotted with its key head's keys (head h uses key head h // (H / K), as the
  reference's `repeat_kv`), scaled by 1/sqrt(Hd), softmaxed and summed over the values, all in
  float32, then rounded once to the model's dtype: torch's path widened to float32
  (`layers._sdpa`), to float rounding (another order of the sums; e^x by a polynomial within
  2 ulp of float32's).

The loops are written in GCC's generic vectors of 16 float32 lanes (one AVX-512 register, two
AVX2 ones, four SSE or NEON ones), a key head's query heads together so that each key and
value is widened once for all of them; key heads split between threads where the keys are
many enough to pay for a parallel region. `benchmarks/bench_cpu_attention.py` measures it
against torch's path.

Only full-attention layers without sinks take it (a ring layer, GPT-OSS's sinks, a masked
step keep torch's path); the caller checks `applies`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from offload_rt.model import native
from offload_rt.model.kvcache import KVCache

# the loops, shared with `model/rowlayer.py`
BODY = r"""
namespace {

// x (D) of dtype C -> y (D) float32: the first `rot` dimensions rotated, every value
// rounded through the dtype (as the torch path stores the rotated head)
template <class C>
inline void rotate(const typename C::T* x, const typename C::T* cs, const typename C::T* sn,
                   int64_t rot, int64_t D, float* y) {
    for (int64_t i = 0; i < D; ++i) y[i] = C::get(x[i]);
    const int64_t half = rot / 2;
    for (int64_t i = 0; i < half; ++i) {
        const float a = y[i], b = y[i + half];
        y[i] = C::get(C::put(a * C::get(cs[i]) - b * C::get(sn[i])));
        y[i + half] = C::get(C::put(b * C::get(cs[i + half]) + a * C::get(sn[i + half])));
    }
}

// a row of D values widened into ceil(D / 16) vectors, the last one's missing lanes 0
template <class C>
inline void load_row(const typename C::T* p, int64_t D, v16* row) {
    int64_t c = 0;
    for (; 16 * (c + 1) <= D; ++c) row[c] = C::load(p + 16 * c);
    if (16 * c < D) {
        float tail[16] = {0.f};
        for (int64_t j = 0; 16 * c + j < D; ++j) tail[j] = C::get(p[16 * c + j]);
        row[c] = F32::load(tail);
    }
}

template <class C>
void attend(const void* qv, const void* kv, const void* vv, const void* cosv, const void* sinv,
            int64_t rot, void* kcv, void* vcv, int64_t S, int64_t pos, int64_t len, int64_t H,
            int64_t KH, int64_t D, void* outv, int64_t threads) {
    using T = typename C::T;
    const T *q = (const T*)qv, *k = (const T*)kv, *v = (const T*)vv;
    const T *cs = (const T*)cosv, *sn = (const T*)sinv;
    T *kc = (T*)kcv, *vc = (T*)vcv, *out = (T*)outv;
    std::vector<float> tmp(D);
    for (int64_t h = 0; h < KH; ++h) {
        rotate<C>(k + h * D, cs, sn, rot, D, tmp.data());
        T* kdst = kc + (h * S + pos) * D;
        T* vdst = vc + (h * S + pos) * D;
        for (int64_t i = 0; i < D; ++i) {
            kdst[i] = C::put(tmp[i]);
            vdst[i] = v[h * D + i];
        }
    }
    const int64_t group = H / KH, vecs = (D + 15) / 16;
    const float scale = 1.0f / std::sqrt(float(D));
    // the key heads split between threads past a couple of keys (from 2^16 values down to 2^11:
    // an int4 step 3.6-5% faster at 64-token contexts, a bfloat16 one unchanged)
    const int nt = (len * H * D >= (int64_t(1) << 11)) ? int(threads) : 1;
    #pragma omp parallel num_threads(nt) if(nt > 1)
    {
        // a key head's query heads together: each key and value widened once for all of them
        std::vector<float> qf(16 * vecs, 0.f), p(group * len);
        std::vector<v16> qr(group * vecs), acc(group * vecs), row(vecs);
        #pragma omp for schedule(static)
        for (int64_t kh = 0; kh < KH; ++kh) {
            for (int64_t g = 0; g < group; ++g) {
                rotate<C>(q + (kh * group + g) * D, cs, sn, rot, D, qf.data());
                for (int64_t c = 0; c < vecs; ++c) qr[g * vecs + c] = F32::load(&qf[16 * c]);
            }
            const T* keys = kc + kh * S * D;
            const T* values = vc + kh * S * D;
            for (int64_t s = 0; s < len; ++s) {
                load_row<C>(keys + s * D, D, row.data());
                for (int64_t g = 0; g < group; ++g) {
                    v16 d = qr[g * vecs] * row[0];
                    for (int64_t c = 1; c < vecs; ++c) d += qr[g * vecs + c] * row[c];
                    p[g * len + s] = hsum(d) * scale;
                }
            }
            for (int64_t g = 0; g < group; ++g) {
                float* pg = p.data() + g * len;
                float top = -INFINITY, total;
                for (int64_t s = 0; s < len; ++s) top = pg[s] > top ? pg[s] : top;
                v16 sum = {};
                int64_t s = 0;
                for (; s + 16 <= len; s += 16) {
                    const v16 e = exp16(F32::load(pg + s) - top);
                    std::memcpy(pg + s, &e, 64);
                    sum += e;
                }
                total = hsum(sum);
                for (; s < len; ++s) {  // the last keys
                    pg[s] = std::exp(pg[s] - top);
                    total += pg[s];
                }
                const float inv = 1.0f / total;
                for (s = 0; s < len; ++s) pg[s] *= inv;
            }
            for (auto& a : acc) a = v16{};
            for (int64_t s = 0; s < len; ++s) {
                load_row<C>(values + s * D, D, row.data());
                for (int64_t g = 0; g < group; ++g) {
                    const float w = p[g * len + s];
                    for (int64_t c = 0; c < vecs; ++c) acc[g * vecs + c] += w * row[c];
                }
            }
            for (int64_t g = 0; g < group; ++g)
                for (int64_t i = 0; i < D; ++i)
                    out[(kh * group + g) * D + i] = C::put(acc[g * vecs + i / 16][i % 16]);
        }
    }
}

}  // namespace
"""

_SOURCE = (
    native.PRELUDE
    + BODY
    + r"""
// q (H, D), k and v (KH, D) of this step; cos, sin (rot) at its position (rot 0: no
// rotation); the layer's cache (KH, S, D), written at pos; attention over keys 0 .. len - 1
// into out (H, D). dtype: 0 float32, 1 bfloat16, 2 float16.
extern "C" void kernel(const void* q, const void* k, const void* v, const void* cs,
                       const void* sn, int64_t rot, void* kc, void* vc, int64_t S, int64_t pos,
                       int64_t len, int64_t H, int64_t KH, int64_t D, void* out,
                       int64_t threads, int64_t dtype) {
    if (dtype == 0) attend<F32>(q, k, v, cs, sn, rot, kc, vc, S, pos, len, H, KH, D, out, threads);
    if (dtype == 1) attend<BF16>(q, k, v, cs, sn, rot, kc, vc, S, pos, len, H, KH, D, out, threads);
    if (dtype == 2) attend<F16>(q, k, v, cs, sn, rot, kc, vc, S, pos, len, H, KH, D, out, threads);
}
"""
)

_ARGTYPES = ("const void*",) * 5 + ("int64_t", "void*", "void*") + ("int64_t",) * 6
_ARGTYPES += ("void*", "int64_t", "int64_t")


def applies(
    cache: KVCache, layer: int, dtype: torch.dtype, sinks: torch.Tensor | None, mask: object
) -> bool:
    """Whether a one-row step's attention at `layer` can take this path: a full layer of a
    one-row CPU cache of the activations' float dtype, no sinks, no mask (every key visible),
    and the code built."""
    keys = cache.keys[layer]
    return (
        cache.windows[layer] is None
        and keys.dtype == dtype
        and sinks is None
        and mask is None
        and keys.device.type == "cpu"
        and keys.shape[0] == 1
        and keys.is_contiguous()
        and keys.dtype in native.DTYPE_CODES
        and _kernel() is not None
    )


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    cache: KVCache,
    layer: int,
    position: int,
    kv_len: int,
) -> torch.Tensor:
    """q (H Hd), k and v (K Hd) of one token at `position`, contiguous, of the cache's dtype;
    rope: its cos and sin (..., Hr) from `RopeTables.at`, or None where q and k are already
    rotated. Writes k, v into the cache; returns the heads' outputs side by side (1, 1, H Hd)
    over keys 0 .. kv_len - 1. The caller has checked `applies`."""
    keys, values = cache.keys[layer], cache.values[layer]  # (1, K, S, Hd)
    _, kv_heads, max_len, hd = keys.shape
    if not 0 <= position < kv_len <= max_len:  # the C++ would write past the cache
        raise IndexError(
            f"position {position} and {kv_len} keys do not fit a cache of {max_len} positions"
        )
    if rope is None:
        cos = sin = q  # not read
        rot = 0
    else:
        cos, sin = (t.reshape(-1).contiguous() for t in rope)
        rot = cos.shape[0]
    out = torch.empty((1, 1, q.numel()), dtype=q.dtype)
    kernel = _kernel()
    assert kernel is not None
    kernel(
        q, k, v, cos, sin, rot, keys, values, max_len, position, kv_len,
        q.numel() // hd, kv_heads, hd, out, torch.get_num_threads(), native.DTYPE_CODES[q.dtype],
    )  # fmt: skip
    return out


def _kernel() -> Callable[..., None] | None:
    return native.build("one-query attention", _ARGTYPES, _SOURCE)
