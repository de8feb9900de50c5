"""The work between a CPU decode step's matrix products, compiled: one sequence, one token.

A batch-1 decode step of a large model on the CPU spends most of its time in matrix-vector
products (`cpukernels`), and the rest in some seventy small torch operations a layer (norms,
the rotary embedding, head reshapes, residual adds, the router's softmax and top-k, the
weighted sum of the experts' outputs), each a few microseconds of dispatch for a few hundred
floats of work: 2-4 ms a token in all, a fifth to a third of the step at 8 bits. Here those
operations run as a handful of compiled functions a layer instead, each traced from the same
Python as the batched path (`rms_norm`, `split_heads`, `route`) and compiled once per shape by
`cpukernels.COMPILED`:

- `enter`: the previous MoE layer's experts summed (ascending expert order, each term rounded
  to the model's dtype, as `moe._single_token`), a shared expert added, the residual, and the
  next RMSNorm (a layer's input norm, or the final one);
- `heads`: the q/k/v biases, q/k norms, clipping, the split into heads and the rotation;
- `leave`: the output bias, the residual, the MoE input norm, the router (scores, groups,
  top-k, renormalisation), its choice sorted by expert.

The products, the KV cache write and the attention itself (`layers.attend`) stay as they are,
so do dense MLPs and shared experts. Results agree with the batched path to float rounding
(Inductor fuses multiply-adds and keeps 16-bit intermediates in float32 registers), not bit
for bit. Compiling costs a few seconds per shape and is cached on disk, so only models of
`MIN_HIDDEN` or more take this path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from offload_rt.model.cpukernels import COMPILED, DTYPES
from offload_rt.model.layers import AttentionSpec, AttentionWeights, rms_norm, split_heads
from offload_rt.model.moe import RouterSpec, route

MIN_HIDDEN = 1024  # smaller models keep the eager operations (compiling costs seconds)


def applies(h: torch.Tensor, hidden_size: int) -> bool:
    """Whether a step whose embedded tokens are h takes this path."""
    return h.numel() == hidden_size and serves(h.device, h.dtype, hidden_size)


def serves(device: torch.device, dtype: torch.dtype, hidden_size: int) -> bool:
    """Whether one token of one sequence of a model of this device, dtype and hidden size
    takes this path."""
    return (
        device.type == "cpu"
        and hidden_size >= MIN_HIDDEN
        and dtype in DTYPES
        and COMPILED.enabled()
    )


def _call(fn: Callable[..., tuple], static: tuple, *args: torch.Tensor) -> tuple:
    # a few thousand floats of work: one thread (a parallel region costs more than it saves)
    kernel = COMPILED.get(fn, args, static, threads=1)
    return fn(*static, *args) if kernel is None else kernel(*args)


def _enter(
    eps: float, k: int, shared: bool, h: torch.Tensor, norm: torch.Tensor, *rest: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    ys, weights = rest[:k], rest[k]
    out = (ys[0] * weights[0]).to(h.dtype)
    for j in range(1, k):
        out = out + (ys[j] * weights[j]).to(h.dtype)
    if shared:
        out = out + rest[k + 1]
    h = h + out.view_as(h)
    return h, rms_norm(h, norm, eps)


def _norm(eps: float, h: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor]:
    return (rms_norm(h, norm, eps),)


def enter(
    h: torch.Tensor,
    norm: torch.Tensor,
    eps: float,
    moe: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h (1, 1, D) plus the MoE output `moe` left by the previous layer (its experts' outputs
    (1, D) in ascending expert order, their weights (k,) float32, a shared expert's output or
    None), and that sum through the RMSNorm `norm`."""
    if moe is None:
        return h, _call(_norm, (eps,), h, norm)[0]
    ys, weights, shared = moe
    extra = () if shared is None else (shared,)
    static = (eps, len(ys), shared is not None)
    return _call(_enter, static, h, norm, *ys, weights, *extra)  # type: ignore[return-value]


def _heads(
    spec: AttentionSpec,
    opt: tuple[str, ...],
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *tensors: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    given = dict(zip(opt, tensors))
    if "bqkv" in given:
        qkv = qkv + given["bqkv"]
    q, k, v = split_heads(qkv, given.get("q_norm"), given.get("k_norm"), spec, (cos, sin))
    return q.contiguous(), k.contiguous(), v.contiguous()


def heads(
    qkv: torch.Tensor, w: AttentionWeights, spec: AttentionSpec, rope: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stacked q/k/v product (1, 1, (H + 2K) Hd), no bias yet -> q, k, v by head, as
    `layers.split_heads`."""
    names = [n for n in ("bqkv", "q_norm", "k_norm") if getattr(w, n) is not None]
    tensors = [getattr(w, n) for n in names]
    return _call(_heads, (spec, tuple(names)), qkv, *rope, *tensors)  # type: ignore[return-value]


def _leave(
    eps: float,
    spec: RouterSpec,
    opt: tuple[str, ...],
    h: torch.Tensor,
    o: torch.Tensor,
    norm: torch.Tensor,
    router: torch.Tensor,
    *tensors: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    given = dict(zip(opt, tensors))
    if "bo" in given:
        o = o + given["bo"]
    h = h + o
    m = rms_norm(h, norm, eps).reshape(1, -1)
    weights, experts = route(m, router, spec, given.get("router_bias"), given.get("correction"))
    # ascending expert order without a sort (a library call of ~15 µs): expert i goes to the
    # place of how many chosen experts have smaller ids (the k ids are distinct)
    e, w = experts[0], weights[0]
    rank = (e[None, :] < e[:, None]).sum(1)  # (k,)
    place = rank[:, None] == torch.arange(e.shape[0])[None, :]  # (k, k): i -> its place
    return h, m, (w[:, None] * place).sum(0), (e[:, None] * place).sum(0)


def leave(
    h: torch.Tensor,
    o: torch.Tensor,
    bo: torch.Tensor | None,
    norm: torch.Tensor,
    eps: float,
    router: torch.Tensor,
    spec: RouterSpec,
    router_bias: torch.Tensor | None,
    correction: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """After attention's output product o (1, 1, D): h with o (and its bias) added, the MoE
    input m (1, D) normed, and the router's choice: weights (k,) float32 and experts, both in
    ascending expert order."""
    named = {"bo": bo, "router_bias": router_bias, "correction": correction}
    names = tuple(n for n, t in named.items() if t is not None)
    tensors = [named[n] for n in names]
    static = (eps, spec, names)
    h, m, weights, experts = _call(_leave, static, h, o, norm, router, *tensors)
    return h, m, weights, experts.tolist()


def _swiglu(y: torch.Tensor) -> tuple[torch.Tensor]:
    gate, up = y.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up,)


def swiglu(y: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) · up of one row's stacked gate and up products y (1, 2F), compiled; None
    where this path does not apply (the caller computes it)."""
    if not applies(y, y.shape[-1]) or y.dim() != 2:
        return None
    return _call(_swiglu, (), y)[0]
