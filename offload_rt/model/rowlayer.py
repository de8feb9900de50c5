"""A one-row CPU decode step's layer in two C++ calls: float, int8 and int4 models.

Through the one-row path of `decoder._one_row`, a layer of an int4 model (experts and dense
weights as affine codes, `dense_quant="int4"`) with bfloat16 activations is some fifteen calls:
the compiled glue, the int4 products of q/k/v and the output (`packed`), the C++ attention
(`onequery`), the router, and each chosen expert's three calls. The products run at memory
speed; the step still spent ~1.9 ms of 6.4 outside them (`benchmarks/profile_cpu_step.py`,
products replayed back to back 4.5 ms). Here a layer is two calls:

1. `attend`: the previous layer's experts' outputs summed into the residual with their weights
   (each term and sum rounded to the activations' dtype, as `onerow.enter`), the input
   RMSNorm, the q/k/v product, q/k norms and clipping where the family has them, the
   rotation, cache write and attention (`onequery`'s loops), the output product, the
   residual, the MoE input's RMSNorm and the router (softmax, top k, renormalised where the
   family does, scaled) -> the chosen experts, in ascending order, and their weights;
2. the backend looks the chosen experts up (its bookkeeping: residency, counters, eviction
   ticks), then `experts`: each expert's w13 rows, SwiGLU (silu rounded to the activations'
   dtype, times up, rounded), w2 rows, into the layer's output rows.

The matrices' rows: `model/rows.py` (float, int8 and int4 formats). Threads split each
product's rows as `packed` does (each output one thread's sum). Every rounding is the one-row
path's, so results equal it to float rounding (sums in other orders). It serves a layer whose
attention has no biases or sinks (q/k norms, per head or over the projection, and clipping it
takes), on a full (not ring) layer of a one-row cache; a MoE block with a plain softmax router
and no shared expert; the rest keeps the one-row path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from offload_rt.model import native, onequery, rowparts, rows
from offload_rt.model.layers import AttentionSpec, AttentionWeights
from offload_rt.model.moe import RouterSpec
from offload_rt.model.rows import matrix, pointers

MAX_K = 8  # experts a token

# the C++ (built by Inductor's toolchain for this CPU; the tests build it for AVX2 and for no
# vector ISA too); a whole step in one call of it: `model/rowstep.py`
SOURCE = (
    native.PRELUDE
    + onequery.BODY
    + rows.LOOPS
    + rowparts.PARTS
    + r"""
namespace {

// call 2: m (D) through the k experts of `t` (6 pointers each: w13's and w2's, as `Rows`)
template <class C>
void experts(const typename C::T* m, typename C::T* ys, const int64_t* t, int64_t D, int64_t F,
             int64_t k, int64_t G, int64_t B, int64_t threads) {
    using T = typename C::T;
    std::vector<float> y(k * 2 * F);
    std::vector<T> hid(k * F);
    std::vector<std::vector<float>> hs(k);
    const std::vector<float> xs = Rows<C>{t, D, G, B}.prepare(m);
    #pragma omp parallel num_threads(threads)
    {
        std::vector<float> hf(F);
        for (int64_t e = 0; e < k; ++e) {
            const Rows<C> r13{t + 6 * e, D, G, B};
            #pragma omp for schedule(static) nowait
            for (int64_t n = 0; n < 2 * F; ++n)
                y[e * 2 * F + n] = C::get(C::put(r13(n, m, xs.data())));
        }
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int64_t e = 0; e < k; ++e) {
            swiglu<C>(&y[e * 2 * F], &y[e * 2 * F + F], hf.data(), F);
            int64_t j = 0;
            for (; j + 16 <= F; j += 16) C::store(&hid[e * F + j], F32::load(&hf[j]));
            for (; j < F; ++j) hid[e * F + j] = C::put(hf[j]);
            hs[e] = Rows<C>{t + 6 * e + 3, F, G, B}.prepare(&hid[e * F]);
        }
        for (int64_t e = 0; e < k; ++e) {
            const Rows<C> r2{t + 6 * e + 3, F, G, B};
            #pragma omp for schedule(static) nowait
            for (int64_t n = 0; n < D; ++n)
                ys[e * D + n] = C::put(r2(n, &hid[e * F], hs[e].data()));
        }
    }
}

// call 1: see `kernel`
template <class C>
void attention(typename C::T* h, const typename C::T* ys, float* w, int64_t k_prev,
               const int64_t* t, const void* cs, const void* sn, int64_t rot, void* kc, void* vc,
               int64_t S, int64_t pos, int64_t H, int64_t KH, int64_t Hd, int64_t D, int64_t E,
               int64_t k, int64_t G, int64_t B, float eps, float qk_eps, float clip,
               int64_t renormalize, float scale, typename C::T* m, int64_t* chosen,
               int64_t threads) {
    using T = typename C::T;
    const int64_t width = (H + 2 * KH) * Hd;
    std::vector<T> a(D), qkv(width), att(H * Hd), o(D);
    gather<C>(h, ys, w, k_prev, D);
    rms<C>(h, (const T*)t[0], eps, D, a.data());
    rows<C>(a.data(), t + 3, width, D, G, B, qkv.data(), threads);
    // q and k through their RMSNorms (`layers._qk_norm`): t[9], t[10] their weights (or 0), each
    // over t[11] / t[12] values at a time (a head's, or all of q's / k's)
    for (int64_t j = 0; t[9] && j < H * Hd; j += t[11])
        rms<C>(&qkv[j], (const T*)t[9], qk_eps, t[11], &qkv[j]);
    for (int64_t j = 0; t[10] && j < KH * Hd; j += t[12])
        rms<C>(&qkv[H * Hd + j], (const T*)t[10], qk_eps, t[12], &qkv[H * Hd + j]);
    for (int64_t j = 0; clip > 0.f && j < width; ++j)  // then q, k, v clamped (OLMoE's clip_qkv)
        qkv[j] = C::put(std::min(std::max(C::get(qkv[j]), -clip), clip));
    const T* q = qkv.data();
    attend<C>(q, q + H * Hd, q + (H + KH) * Hd, cs, sn, rot, kc, vc, S, pos, pos + 1, H, KH, Hd,
              att.data(), threads);
    rows<C>(att.data(), t + 6, D, H * Hd, G, B, o.data(), threads);
    add<C>(h, o.data(), D);
    rms<C>(h, (const T*)t[1], eps, D, m);
    // the router: float32 sums rounded to the dtype (`moe._logits`), softmax in float32
    const T* router = (const T*)t[2];
    std::vector<float> mf(D), scores(E);
    for (int64_t i = 0; i < D; ++i) mf[i] = C::get(m[i]);
    float top = -INFINITY;
    for (int64_t e = 0; e < E; ++e) {
        scores[e] = C::get(C::put(dot_row<C>(router + e * D, mf.data(), D)));
        top = scores[e] > top ? scores[e] : top;
    }
    float total = 0.f;
    for (int64_t e = 0; e < E; ++e) {
        scores[e] = std::exp(scores[e] - top);
        total += scores[e];
    }
    for (int64_t e = 0; e < E; ++e) scores[e] /= total;
    top_k(scores.data(), E, k, chosen);
    float sum = 0.f;
    for (int64_t j = 0; j < k; ++j) sum += scores[chosen[j]];
    for (int64_t j = 0; j < k; ++j)
        w[j] = (renormalize ? scores[chosen[j]] / sum : scores[chosen[j]]) * scale;
}

template <class C>
void run(int64_t mode, void* h, void* ys, float* w, int64_t k_prev, const int64_t* t,
         const void* cs, const void* sn, int64_t rot, void* kc, void* vc, int64_t S, int64_t pos,
         int64_t H, int64_t KH, int64_t Hd, int64_t D, int64_t F, int64_t E, int64_t k,
         int64_t G, int64_t B, float eps, float qk_eps, float clip, int64_t renormalize,
         float scale, void* m, int64_t* chosen, int64_t threads, int64_t layers, int64_t GE,
         int64_t BE) {
    using T = typename C::T;
    if (mode == 2) return experts<C>((const T*)m, (T*)ys, t, D, F, k, G, B, threads);
    if (mode == 4) return rows<C>((const T*)h, t, F, D, G, B, (T*)ys, threads);
    if (mode == 6) {  // greedy steps, each mode 5 from the last one's argmax: kc the run's table
        int64_t* run_t = (int64_t*)kc;
        const T* embed = (const T*)run_t[1];
        const int64_t* stops = (const int64_t*)run_t[3];
        int64_t* out = (int64_t*)run_t[5];
        int64_t token = run_t[6];
        for (int64_t i = 0; i < run_t[2]; ++i) {
            std::memcpy(h, embed + token * D, D * sizeof(T));
            run<C>(5, h, ys, w, 0, t, cs, sn, rot, (void*)run_t[0], vc, S, pos + i, H, KH, Hd, D,
                   F, E, k, G, B, eps, qk_eps, clip, renormalize, scale, m,
                   chosen + i * layers * k, threads, layers, GE, BE);
            token = out[i] = ((const int64_t*)run_t[0])[7];
            run_t[7] = i + 1;
            bool stop = false;
            for (int64_t j = 0; j < run_t[4]; ++j) stop = stop || stops[j] == token;
            if (stop) break;
        }
        return;
    }
    if (mode == 3 || mode == 5) {  // every layer: t holds each one's row of `TokenTable`
        const int64_t stride = 15 + 6 * E;
        std::vector<int64_t> te(6 * k);
        std::vector<T> c(rot), s(rot);  // cs, sn: float32 tables, their row at pos rounded
        for (int64_t i = 0; i < rot; ++i) {
            c[i] = C::put(((const float*)cs)[pos * rot + i]);
            s[i] = C::put(((const float*)sn)[pos * rot + i]);
        }
        for (int64_t l = 0; l < layers; ++l) {
            const int64_t* tl = t + l * stride;
            int64_t* cl = chosen + l * k;
            attention<C>((T*)h, (const T*)ys, w, l == 0 ? k_prev : k, tl, c.data(), s.data(), rot,
                         (void*)tl[13], (void*)tl[14], S, pos, H, KH, Hd, D, E, k, G, B, eps,
                         qk_eps, clip, renormalize, scale, (T*)m, cl, threads);
            for (int64_t j = 0; j < k; ++j)
                for (int64_t i = 0; i < 6; ++i) te[6 * j + i] = tl[15 + 6 * cl[j] + i];
            experts<C>((const T*)m, (T*)ys, te.data(), D, F, k, GE, BE, threads);
        }
        if (mode == 5) {  // then the model's head: kc its table, vc the logits
            const int64_t* head = (const int64_t*)kc;
            gather<C>((T*)h, (const T*)ys, w, layers > 0 ? k : k_prev, D);
            rms<C>((const T*)h, (const T*)head[0], eps, D, (T*)m);
            rows<C>((const T*)m, head + 1, head[4], D, head[5], head[6], (T*)vc, threads);
            ((int64_t*)kc)[7] = argmax<C>((const T*)vc, head[4]);
        }
        return;
    }
    attention<C>((T*)h, (const T*)ys, w, k_prev, t, cs, sn, rot, kc, vc, S, pos, H, KH, Hd, D, E,
                 k, G, B, eps, qk_eps, clip, renormalize, scale, (T*)m, chosen, threads);
}

}  // namespace

// mode 1, attention half. h (D): the residual, replaced; ys (k, D), w (k): the previous
// layer's experts' outputs and weights (k_prev of them, 0 for the first layer). t: the layer's
// pointers (input norm, post-attention norm, router, then those of wqkv and wo, 3 each, as
// `Rows` reads them; then the q and k norms' weights or 0, and the spans they each norm).
// Writes m (D), chosen (k) and weights (k) for this layer.
// mode 2, experts: m (D) through the k experts of `t` (6 pointers each) into ys (k, D).
// mode 4, one product: h (D) times the matrix of `t` (F rows, as `Rows`) into ys (F).
// mode 3, a whole step: modes 1 and 2 for each of `layers` layers, t their rows (a layer's 13
// values as mode 1's, its keys' and values' caches, then its E experts' 6 pointers each),
// chosen (layers, k); the experts' form BE, GE; cs, sn: the float32 rope tables (positions,
// rot), read at pos.
// mode 5, a whole step and the model's head: mode 3 (none where layers is 0), then the last
// layer's experts (k, or k_prev where layers is 0) summed into h, h through the final RMSNorm
// into m (D) and m times lm_head into vc (V logits); kc: the head's table (the norm's weight,
// lm_head's 3 pointers as `Rows`, V, its group and format, then the logits' argmax, written).
// mode 6, greedy steps: up to n of mode 5, the first from token `first`'s row of the embedding
// table, each next one from the last one's argmax, at pos, pos + 1, ..., ending after a step
// whose argmax is one of the stop ids; chosen (n, layers, k). kc: the run's table (the head's
// table, the embedding table (V rows of D), n, the stop ids and their count, the tokens' out
// (n), first, then the steps done, written); vc: the last step's logits.
// dtype: the activations' (0 float32, 1 bfloat16, 2 float16); B, G: the weights' format and
// group, as `Rows` (B == 2 with bfloat16 only).
extern "C" void kernel(int64_t mode, void* h, void* ys, float* w, int64_t k_prev,
                       const int64_t* t, const void* cs, const void* sn, int64_t rot, void* kc,
                       void* vc, int64_t S, int64_t pos, int64_t H, int64_t KH, int64_t Hd,
                       int64_t D, int64_t F, int64_t E, int64_t k, int64_t G, int64_t B,
                       float eps, float qk_eps, float clip, int64_t renormalize, float scale,
                       void* m, int64_t* chosen, int64_t threads, int64_t dtype,
                       int64_t layers, int64_t GE, int64_t BE) {
    if (dtype == 0)
        run<F32>(mode, h, ys, w, k_prev, t, cs, sn, rot, kc, vc, S, pos, H, KH, Hd, D, F, E, k,
                 G, B, eps, qk_eps, clip, renormalize, scale, m, chosen, threads, layers, GE, BE);
    if (dtype == 1)
        run<BF16>(mode, h, ys, w, k_prev, t, cs, sn, rot, kc, vc, S, pos, H, KH, Hd, D, F, E, k,
                  G, B, eps, qk_eps, clip, renormalize, scale, m, chosen, threads, layers, GE, BE);
    if (dtype == 2)
        run<F16>(mode, h, ys, w, k_prev, t, cs, sn, rot, kc, vc, S, pos, H, KH, Hd, D, F, E, k,
                 G, B, eps, qk_eps, clip, renormalize, scale, m, chosen, threads, layers, GE, BE);
}
"""
)
# the parameters of SOURCE's `kernel`
ARGTYPES = ("int64_t", "void*", "void*", "float*", "int64_t", "const int64_t*")
ARGTYPES += ("const void*", "const void*", "int64_t", "void*", "void*") + ("int64_t",) * 11
ARGTYPES += ("float",) * 3 + ("int64_t", "float", "void*", "int64_t*", "int64_t", "int64_t")
ARGTYPES += ("int64_t",) * 3


@dataclass
class LayerPlan:
    """One layer's pointers for `attend` (the tensors they point into are held here)."""

    # int64: input norm, post-attention norm, router, wqkv (3), wo (3), q and k norms, their spans
    table: torch.Tensor
    held: tuple[torch.Tensor, ...]
    form: tuple[int, int]  # the matrices' (format, group), as `_matrix`


def plan(
    attn: object,
    spec: object,
    input_norm: torch.Tensor,
    post_norm: torch.Tensor,
    router: torch.Tensor,
    router_spec: RouterSpec,
    extras: Sequence[torch.Tensor | None],
    dtype: torch.dtype,
) -> LayerPlan | None:
    """The layer's plan for activations of `dtype`, or None where `attend` does not serve it
    (`extras`: the MoE block's router bias, correction and shared expert, which it does not
    do). q/k norms are taken with the attention spec's eps, then its clipping."""
    if not isinstance(attn, AttentionWeights) or not isinstance(spec, AttentionSpec):
        return None
    plain_attention = all(t is None for t in (attn.bqkv, attn.bo, attn.sinks))
    norms = (attn.q_norm, attn.k_norm)  # both or neither (`layers._normed_qkv`)
    if not plain_attention or any(t is not None for t in extras):
        return None
    if spec.clip_qkv is not None and not spec.clip_qkv > 0:
        return None
    if (norms[0] is None) != (norms[1] is None) or any(
        t is not None and (t.dtype != dtype or not t.is_contiguous()) for t in norms
    ):
        return None
    if router_spec.scoring != "softmax" or not router_spec.plain or router_spec.top_k > MAX_K:
        return None
    if dtype not in native.DTYPE_CODES or not router.is_contiguous():
        return None
    if {input_norm.dtype, post_norm.dtype, router.dtype} != {dtype}:
        return None
    parts = [matrix(attn.wqkv, dtype), matrix(attn.wo, dtype)]
    if parts[0] is None or parts[1] is None or parts[0][1] != parts[1][1]:
        return None
    held = (input_norm, post_norm, router, *parts[0][0], *parts[1][0], *norms)
    # each norm's span: a head (its weight (Hd,), Qwen3-MoE) or all of q's / k's (OLMoE)
    spans = [0 if t is None else t.numel() for t in norms]
    table = torch.tensor(pointers(held) + spans, dtype=torch.int64)
    return LayerPlan(table, held, parts[0][1])  # type: ignore[arg-type]


def available() -> bool:
    """Whether the loops build."""
    return cpp() is not None


def cpp() -> Callable[..., None] | None:
    """The built C++ entry point (`kernel` of SOURCE), or None where it does not build."""
    return native.build("one-row layer", ARGTYPES, SOURCE)


class Step:
    """One decode step's state across its layers: the residual h, the last layer's chosen
    experts' outputs ys (k, D) and weights w (k), the MoE input m."""

    def __init__(self, h: torch.Tensor, k: int) -> None:
        d = h.numel()
        self.h = h.reshape(d).clone()
        self.ys = torch.empty((k, d), dtype=h.dtype)
        self.w = torch.empty(k, dtype=torch.float32)
        self.m = torch.empty((1, d), dtype=h.dtype)
        self.chosen = torch.empty(k, dtype=torch.int64)
        self.pending = 0  # experts in ys and w not yet summed into h

    def moe(self) -> tuple[list[torch.Tensor], torch.Tensor, None] | None:
        """The pending experts as `onerow.enter` takes them."""
        if not self.pending:
            return None
        return [self.ys[j : j + 1] for j in range(self.pending)], self.w[: self.pending], None

    def set_outputs(self, outputs: Sequence[torch.Tensor]) -> None:
        """The experts' outputs (1, D), computed elsewhere, in the chosen order."""
        for j, y in enumerate(outputs):
            self.ys[j].copy_(y.reshape(-1))
        self.pending = len(outputs)


def attend(
    step: Step,
    layer: LayerPlan,
    spec: AttentionSpec,
    rope: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor,
    values: torch.Tensor,
    position: int,
    router: RouterSpec,
    experts: int,
    eps: float,
) -> list[int]:
    """Call 1 for a layer at `position` (its cache's keys and values (1, K, S, Hd), checked by
    `onequery.applies`): the pending experts summed into h, attention, the router. Returns the
    chosen experts in ascending order (their weights in step.w, the MoE input in step.m)."""
    kernel = cpp()
    assert kernel is not None
    max_len = keys.shape[2]
    if not 0 <= position < max_len:  # the C++ would write past the cache
        raise IndexError(f"position {position} does not fit a cache of {max_len} positions")
    cos, sin = (t.reshape(-1).contiguous() for t in rope)
    d, k = step.h.numel(), router.top_k
    kernel(
        1, step.h, step.ys, step.w, step.pending, layer.table, cos, sin, cos.shape[0], keys,
        values, max_len, position, spec.heads, spec.kv_heads, spec.head_dim, d, 0, experts, k,
        layer.form[1], layer.form[0], eps, spec.eps, spec.clip_qkv or 0.0, router.renormalize,
        router.scale, step.m, step.chosen,
        torch.get_num_threads(), native.DTYPE_CODES[step.h.dtype], 0, 0, 0,
    )  # fmt: skip
    step.pending = 0
    return step.chosen.tolist()


def experts(step: Step, ffns: Sequence[object]) -> bool:
    """Call 2: the chosen experts (`SwiGLU`s of matrices of a form `_matrix` takes, one form
    for all, in step.chosen's order) on step.m into step.ys; False (nothing done) where they
    are not."""
    kinds = [rows.expert_kind(ffn, step.h.dtype) for ffn in ffns]
    if not kinds or any(k is None or k[1:] != kinds[0][1:] for k in kinds):  # type: ignore[index]
        return False  # one format and width for all of them
    flat = [p for k in kinds for p in k[0]]  # type: ignore[index]
    _, (form, group), width = kinds[0]  # type: ignore[misc]
    kernel = cpp()
    if kernel is None:
        return False
    table = torch.tensor(flat, dtype=torch.int64)
    d, k = step.h.numel(), len(ffns)
    kernel(
        2, step.h, step.ys, step.w, 0, table, step.m, step.m, 0, step.m, step.m, 0, 0, 0, 0, 0,
        d, width, 0, k, group, form, 0.0, 0.0, 0.0, 0, 0.0, step.m, step.chosen,
        torch.get_num_threads(), native.DTYPE_CODES[step.h.dtype], 0, 0, 0,
    )  # fmt: skip
    step.pending = k
    return True


_UNUSED: dict[torch.dtype, torch.Tensor] = {}


def _unused(dtype: torch.dtype) -> torch.Tensor:
    """A tensor for a pointer argument the call's mode does not read."""
    if dtype not in _UNUSED:
        _UNUSED[dtype] = torch.empty(1, dtype=dtype)
    return _UNUSED[dtype]


def product(x: torch.Tensor, w: object) -> torch.Tensor | None:
    """x (1, K) times w (N, K)^T -> (1, N) in x's dtype, by the layers' row loops (for lm_head:
    1.07-1.15x torch's or the compiled kernel in 16 bits); None where they do not take w
    (`_matrix`) or x."""
    if x.dim() != 2 or x.shape[0] != 1 or x.device.type != "cpu":
        return None
    if x.dtype not in native.DTYPE_CODES or (part := matrix(w, x.dtype)) is None:
        return None
    kernel = cpp()
    if kernel is None:
        return None
    held, (form, group) = part
    table = torch.tensor(pointers(held), dtype=torch.int64)
    n, k = w.shape  # type: ignore[attr-defined]
    x = x.contiguous()
    y = torch.empty((1, n), dtype=x.dtype)
    unused, ints, floats = _unused(x.dtype), _unused(torch.int64), _unused(torch.float32)
    kernel(
        4, x, y, floats, 0, table, unused, unused, 0, unused, unused, 0, 0, 0, 0, 0, k, n, 0, 0,
        group, form, 0.0, 0.0, 0.0, 0, 0.0, unused, ints, torch.get_num_threads(),
        native.DTYPE_CODES[x.dtype], 0, 0, 0,
    )  # fmt: skip
    return y
