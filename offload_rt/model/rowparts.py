"""The serial parts of the one-row C++ layer (`model/rowlayer.py`) in C++, after
`native.PRELUDE` and `rows.LOOPS`: the RMSNorm, the residual add, SwiGLU, the router's top k,
the experts' weighted sum into the residual and the logits' argmax. Each rounds where the
one-row path's torch operations round (to the activations' dtype), 16 values at a time where
the work is a vector's.
"""

from __future__ import annotations

PARTS = r"""
namespace {

// h (D) of dtype C through the RMSNorm with weight w into out, as `layers.rms_norm`
// (16 values at a time: the scalar loops took ~15 µs of a layer's serial part)
template <class C>
void rms(const typename C::T* h, const typename C::T* w, float eps, int64_t D,
         typename C::T* out) {
    v16 acc = {};
    int64_t i = 0;
    for (; i + 16 <= D; i += 16) acc = fma16(C::load(h + i), C::load(h + i), acc);
    float sum = hsum(acc);
    for (; i < D; ++i) sum += C::get(h[i]) * C::get(h[i]);
    const float r = 1.f / std::sqrt(sum / float(D) + eps);
    for (i = 0; i + 16 <= D; i += 16)
        C::store(out + i, C::load(w + i) * rounded<C>(C::load(h + i) * r));
    for (; i < D; ++i) out[i] = C::put(C::get(w[i]) * C::get(C::put(C::get(h[i]) * r)));
}

// h (D) += y (D), rounded to dtype C, as torch adds two tensors of it
template <class C>
void add(typename C::T* h, const typename C::T* y, int64_t D) {
    int64_t i = 0;
    for (; i + 16 <= D; i += 16) C::store(h + i, C::load(h + i) + C::load(y + i));
    for (; i < D; ++i) h[i] = C::put(C::get(h[i]) + C::get(y[i]));
}

// silu(g) rounded to dtype C, times u, rounded: h (n) as float32 values
template <class C>
inline void swiglu(const float* gate, const float* up, float* h, int64_t n) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const v16 g = F32::load(gate + j);
        const v16 s = g / (1.f + exp16(-g));
        F32::store(h + j, rounded<C>(rounded<C>(s) * F32::load(up + j)));
    }
    for (; j < n; ++j) {
        const float s = C::get(C::put(gate[j] / (1.f + std::exp(-gate[j]))));
        h[j] = C::get(C::put(s * up[j]));
    }
}

// the top k of E scores (the lower id first among equals), in ascending id order
void top_k(const float* scores, int64_t E, int64_t k, int64_t* chosen) {
    std::vector<char> taken(E, 0);
    for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
            if (!taken[e] && (best < 0 || scores[e] > scores[best])) best = e;
        taken[best] = 1;
    }
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e)
        if (taken[e]) chosen[n++] = e;
}

// h (D) += the k_prev experts' outputs ys (k_prev, D) times their weights w, each product and
// sum rounded to dtype C, as `onerow.enter`
template <class C>
void gather(typename C::T* h, const typename C::T* ys, const float* w, int64_t k_prev,
            int64_t D) {
    int64_t i = 0;
    for (; i + 16 <= D && k_prev > 0; i += 16) {
        v16 acc = rounded<C>(C::load(ys + i) * w[0]);
        for (int64_t j = 1; j < k_prev; ++j)
            acc = rounded<C>(acc + rounded<C>(C::load(ys + j * D + i) * w[j]));
        C::store(h + i, C::load(h + i) + acc);
    }
    for (; i < D && k_prev > 0; ++i) {
        float acc = C::get(C::put(C::get(ys[i]) * w[0]));
        for (int64_t j = 1; j < k_prev; ++j)
            acc = C::get(C::put(acc + C::get(C::put(C::get(ys[j * D + i]) * w[j]))));
        h[i] = C::put(C::get(h[i]) + acc);
    }
}

// the index of x's (n) largest value, the first of equals; a NaN above all (the first NaN), as
// torch.argmax: 16 lanes at a time, each keeping its first best, then the lanes' first best
template <class C>
int64_t argmax(const typename C::T* x, int64_t n) {
    int64_t found = 0, i = 0;
    float top = -INFINITY;
    bool nan = false;
    if (n >= 16) {
        v16 best = C::load(x);
        i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, at = lane;
        i32x16 bad = best != best;
        for (i = 16; i + 16 <= n; i += 16) {
            lane += 16;
            const v16 v = C::load(x + i);
            const i32x16 more = v > best;
            best = more ? v : best;
            at = more ? lane : at;
            bad |= v != v;
        }
        top = best[0], found = at[0];
        for (int j = 1; j < 16; ++j)
            if (best[j] > top || (best[j] == top && at[j] < found)) top = best[j], found = at[j];
        for (int j = 0; j < 16; ++j) nan = nan || bad[j];
    }
    for (; i < n; ++i) {
        const float v = C::get(x[i]);
        nan = nan || v != v;
        if (v > top || (i == 0 && n < 16)) top = v, found = i;
    }
    for (int64_t j = 0; nan && j < n; ++j)
        if (C::get(x[j]) != C::get(x[j])) return j;
    return found;
}

}  // namespace
"""
