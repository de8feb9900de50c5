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

    predict_from: str  # where the model guesses: "attention", "moe" or "both"

    def prefetch(self, layer: int, ranked: Sequence[int], at: str) -> None:
        """Experts of `layer` the current tokens are likely to use, most likely first, as
        guessed at `at` ("attention" or "moe"); how many to load is the prefetcher's rule."""
        ...


SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2")


@dataclass(frozen=True)
class RouterSpec:
    """How a family's router turns logits into each token's experts and weights."""

    top_k: int  # experts per token
    scoring: str = "softmax"  # softmax over the experts, or a sigmoid each (DeepSeek-V3, GLM)
    renormalize: bool = True  # the chosen weights divided by their sum (norm_topk_prob)
    scale: float = 1.0  # the weights times this (routed_scaling_factor)
    groups: int = 1  # experts split into this many equal groups (n_group)
    groups_kept: int = 1  # tokens choose only among the best groups (topk_group)
    group_score: str = "max"  # a group's score: its best expert's (V2), its best two summed (V3)

    @property
    def plain(self) -> bool:
        """The top-k of the raw logits is the choice (no groups)."""
        return self.groups == 1


def route(
    x: torch.Tensor,
    router: torch.Tensor,
    spec: RouterSpec,
    bias: torch.Tensor | None = None,
    correction: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, D), router: (E, D) -> weights (N, k) float32 and expert ids (N, k).
    Softmax or sigmoid scores; `bias` (E,) joins the logits (top-k logits then a softmax over
    them is this, renormalised); `correction` (E,) joins the scores only to choose, the
    weights are the uncorrected scores; with groups, only experts of the `groups_kept` best
    groups are chosen. The families' parsers (`offload_rt/models/`) say which applies."""
    if spec.scoring == "sigmoid":  # computed in float32, as the references keep this router
        scores = torch.sigmoid(F.linear(x.float(), router.float(), bias))  # (N, E)
    else:
        scores = torch.softmax(_logits(x, router, bias).float(), dim=-1)
    choice = scores if correction is None else scores + correction
    if spec.groups > 1:
        choice = _best_groups(choice, spec)
    if choice is scores:
        weights, experts = torch.topk(scores, spec.top_k, dim=-1)
    else:
        experts = torch.topk(choice, spec.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
    if spec.renormalize:
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / (total + 1e-20 if spec.scoring == "sigmoid" else total)
    if spec.scale != 1.0:
        weights = weights * spec.scale
    return weights, experts


def _logits(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (N, D) @ router (E, D)^T (+ bias) in x's dtype. On the CPU, 16-bit ones as float32
    products rounded once (what a 16-bit GEMM with float32 sums gives): MKL's bfloat16 kernel
    took 18 µs for a (1, 1024) x (8, 1024) product and over 100 within a decode step."""
    if x.device.type != "cpu" or x.dtype == torch.float32:
        return F.linear(x, router, bias)
    b = None if bias is None else bias.float()
    return F.linear(x.float(), router.float(), b).to(x.dtype)


def _best_groups(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """choice (N, E) with the experts outside each token's best groups at -inf."""
    n, e = choice.shape
    grouped = choice.view(n, spec.groups, e // spec.groups)  # (N, G, E/G)
    if spec.group_score == "top2":
        score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
    else:
        score = grouped.amax(dim=-1)
    kept = torch.topk(score, spec.groups_kept, dim=-1).indices  # (N, kept)
    mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, kept, True)
    return grouped.masked_fill(~mask[..., None], float("-inf")).view(n, e)


def predict_experts(
    x: torch.Tensor,
    router: torch.Tensor,
    spec: RouterSpec,
    bias: torch.Tensor | None = None,
    correction: torch.Tensor | None = None,
) -> list[int]:
    """The experts some token of x (N, D) would pick among its top-k under `router` (E, D),
    the largest summed routing weight first: what a layer's router makes of a hidden state
    it will see only later, after it has changed a little. One device-to-host sync."""
    weights, experts = route(x, router, spec, bias, correction)  # (N, k) each
    if x.shape[0] == 1:
        order = torch.argsort(weights[0], descending=True, stable=True)
        return experts[0][order].tolist()
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
    spec: RouterSpec,
    layer: int,
    backend: ExpertBackend,
    bias: torch.Tensor | None = None,
    correction: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (N, D) -> (N, D): the weighted sum of each token's top-k experts."""
    weights, experts = route(x, router, spec, bias, correction)
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
