"""The sparse MoE block: router, token grouping, and the expert FFN.

The block never holds expert weights: it groups a step's tokens by chosen expert and hands all
groups of one layer to an `ExpertBackend` in one call, which decides where each expert runs.
Reference: `MixtralSparseMoeBlock` (and Qwen's, OLMoE's) in transformers.
Shape legend: N tokens, D hidden,
E experts per layer, k experts per token, F expert width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from offload_rt.grid import ExpertKey


class ExpertBackend(Protocol):
    """Runs experts wherever they live (this process, a device cache, remote actors)."""

    def run(self, groups: Mapping[ExpertKey, torch.Tensor]) -> dict[ExpertKey, torch.Tensor]:
        """groups: each expert of one layer -> its tokens (n, D). Returns expert -> (n, D)."""
        ...


class ExpertPrefetcher(Protocol):
    """Takes the model's guess of a layer's experts ahead of time (a backend with a cache)."""

    def prefetch(self, layer: int, ranked: Sequence[int], fetch: int | None = None) -> None:
        """Experts of `layer` the current tokens are likely to use, most likely first; load
        the first `fetch` of them (None: all) and keep the rest if they are resident."""
        ...


def route(
    x: torch.Tensor,
    router: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, top-k, renormalised when `renormalize` (Mixtral always; Qwen and
    OLMoE when norm_topk_prob). x: (N, D), router: (E, D), bias: (E,) (GPT-OSS's router has
    one; its top-k logits then softmax is this, renormalised).
    Returns weights (N, k) float32 and expert ids (N, k)."""
    probs = torch.softmax(F.linear(x, router, bias).float(), dim=-1)  # (N, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if not renormalize:
        return weights, experts
    return weights / weights.sum(dim=-1, keepdim=True), experts


def predict_experts(
    x: torch.Tensor, router: torch.Tensor, top_k: int, bias: torch.Tensor | None = None
) -> list[int]:
    """The experts some token of x (N, D) would pick among its top-k under `router` (E, D),
    the largest summed routing weight first: what a layer's router makes of a hidden state
    it will see only later, after it has changed a little. One device-to-host sync."""
    weights, experts = route(x, router, top_k, bias=bias)  # (N, k) each
    if x.shape[0] == 1:
        return experts[0].tolist()  # topk sorts by weight already
    mass = torch.zeros(router.shape[0], dtype=weights.dtype, device=x.device)  # (E,)
    mass.index_add_(0, experts.reshape(-1), weights.reshape(-1))
    order = torch.argsort(mass, descending=True, stable=True)
    ids, picked = torch.stack((order.to(mass.dtype), mass[order])).tolist()
    return [int(e) for e, m in zip(ids, picked) if m > 0]


@dataclass(frozen=True)
class Routing:
    keys: list[ExpertKey]  # experts used this step, ascending
    rows: list[torch.Tensor]  # per expert: token rows (n_e,)
    weights: list[torch.Tensor]  # per expert: routing weight of each row (n_e,) float32


def group_by_expert(layer: int, weights: torch.Tensor, experts: torch.Tensor) -> Routing:
    """Group (token, expert) pairs by expert with one sort and one device-to-host sync."""
    n, k = experts.shape
    flat = experts.reshape(-1)  # (N*k,)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=1).tolist()
    rows = torch.div(order, k, rounding_mode="floor").split(counts)
    flat_w = weights.reshape(-1)[order].split(counts)
    used = [e for e, c in enumerate(counts) if c]
    return Routing(
        keys=[ExpertKey(layer, e) for e in used],
        rows=[rows[e] for e in used],
        weights=[flat_w[e] for e in used],
    )


def moe_block(
    x: torch.Tensor,
    router: torch.Tensor,
    top_k: int,
    layer: int,
    backend: ExpertBackend,
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (N, D) -> (N, D): the weighted sum of each token's top-k experts."""
    weights, experts = route(x, router, top_k, renormalize, bias)
    if x.shape[0] == 1:
        return _single_token(x, weights[0].tolist(), experts[0].tolist(), layer, backend)
    routing = group_by_expert(layer, weights, experts)
    outputs = backend.run({key: x[rows] for key, rows in zip(routing.keys, routing.rows)})
    out = torch.zeros_like(x)
    # ascending expert order, as the reference sums them
    for key, rows, w in zip(routing.keys, routing.rows, routing.weights):
        out.index_add_(0, rows, (outputs[key] * w[:, None]).to(x.dtype))
    return out


def _single_token(
    x: torch.Tensor, weights: list[float], experts: list[int], layer: int, backend: ExpertBackend
) -> torch.Tensor:
    """The decode step of one sequence: no grouping, no scatter. The sum runs in ascending
    expert order, each term rounded to x's dtype first, exactly as the general path's."""
    pairs = sorted(zip(experts, weights))
    outputs = backend.run({ExpertKey(layer, e): x for e, _ in pairs})
    terms = [(outputs[ExpertKey(layer, e)] * w).to(x.dtype) for e, w in pairs]
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out
