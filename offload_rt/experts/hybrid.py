"""Hybrid placement: which experts the CPU computes from host RAM (the CPU set) and which the
device runs, resident or through its cache; a cost model and the planner that minimises it.

The cost model, for one decode step at batch 1 (a token routed to k experts a MoE layer):
- the k choices of a layer are taken as independent draws from its routing rates (uniform:
  k/E each; else a routing trace's per-expert frequencies): j of them land in the CPU set
  (binomial, the set's share of the layer's routing), the other k - j on the device, each
  missing the cache with the layer's miss rate;
- the cache's hit rate for each device expert is Che's approximation of an LRU cache under
  independent requests (uniform rates: exactly slots / device experts);
- while the link moves the m misses (bytes / link rate each), the CPU computes its j experts
  (`cpu_expert_s` each; on a CPU device also the resident ones, the same cores) and the
  device its resident ones; the layer takes the longest of the three, then the device
  computes the experts that arrived. With compute on a miss, a miss goes to the CPU when the
  CPU would finish it before the link would.
The expected seconds per token sum this over the MoE layers. Attention, norms and lm_head cost
the same under every placement and are left out: the figures compare placements.

The planner orders the experts least used first (uniform: spread evenly over the layers,
highest index first) and tries CPU sets made of the first n, n on a grid of one expert per
layer and then every n around the grid's best; the fewest CPU experts among the fastest win.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from offload_rt.grid import ExpertGrid, ExpertKey

TIE = 1e-9  # relative: predictions this close are equal, and the fewer CPU experts win


@dataclass(frozen=True)
class HybridCosts:
    """What one expert costs where it can run, at one row (a decode step at batch 1)."""

    expert_bytes: int  # one packed expert, as it crosses the link
    cpu_expert_s: float  # the CPU computing it from host RAM
    link_bytes_per_s: float  # the host->device link
    device_expert_s: float  # the device computing it from a slot
    device_is_host: bool  # a CPU device (simulated link): its work takes the CPU's cores

    def __post_init__(self) -> None:
        for name in ("expert_bytes", "cpu_expert_s", "link_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HybridCosts.{name} must be positive, got {getattr(self, name)}")
        if not self.device_expert_s >= 0:
            raise ValueError(f"HybridCosts.device_expert_s must be >= 0: {self.device_expert_s}")

    @property
    def link_expert_s(self) -> float:
        return self.expert_bytes / self.link_bytes_per_s

    def describe(self) -> str:
        gbps = self.expert_bytes / self.cpu_expert_s / 1e9
        device = "device (this CPU: no GPU here)" if self.device_is_host else "device"
        return (
            f"expert {self.expert_bytes / 1e6:.1f} MB: CPU {self.cpu_expert_s * 1e3:.3f} ms "
            f"({gbps:.1f} GB/s), link {self.link_expert_s * 1e3:.3f} ms "
            f"({self.link_bytes_per_s / 1e9:.1f} GB/s), {device} "
            f"{self.device_expert_s * 1e3:.3f} ms"
        )


@dataclass(frozen=True)
class Routing:
    """How often a token uses each expert: per layer the rates sum to top_k."""

    grid: ExpertGrid
    top_k: int
    rates: Mapping[ExpertKey, float]  # expected uses per token
    uniform: bool  # every expert of a layer alike (no trace was given)

    @classmethod
    def even(cls, grid: ExpertGrid, top_k: int) -> Routing:
        rate = top_k / grid.experts
        return cls(grid, top_k, {key: rate for key in grid.keys()}, True)

    @classmethod
    def from_counts(
        cls, grid: ExpertGrid, top_k: int, counts: Mapping[ExpertKey, float]
    ) -> Routing:
        """Rates from uses counted per expert (a routing trace); a layer never seen counts
        as uniform."""
        rates = {}
        for layer in grid.layers:
            keys = grid.layer_keys(layer)
            total = sum(counts.get(key, 0.0) for key in keys)
            for key in keys:
                share = counts.get(key, 0.0) / total if total > 0 else 1 / grid.experts
                rates[key] = top_k * share
        return cls(grid, top_k, rates, False)

    def order(self) -> list[ExpertKey]:
        """Every expert, the first to put on the CPU first: least used, and among equals
        spread over the layers (highest expert index first)."""
        experts = reversed(range(self.grid.experts))
        spread = [ExpertKey(layer, e) for e in experts for layer in self.grid.layers]
        rank = {key: i for i, key in enumerate(spread)}
        return sorted(spread, key=lambda key: (self.rates[key], rank[key]))


@dataclass(frozen=True)
class HybridPlan:
    """A placement: `cpu` computed on the CPU, the rest on the device behind `slots` slots."""

    grid: ExpertGrid
    cpu: frozenset[ExpertKey]  # computed on the CPU from host RAM, never loaded
    slots: int  # device slots for the rest (the cache)
    how: str  # what chose it: "auto", "per layer N", "first N MoE layers", "none"
    predicted: Mapping[str, float]  # seconds per token: "cpu only", "cache only", "this plan"
    costs: HybridCosts
    uniform: bool  # the predictions assume uniform routing

    @property
    def device_experts(self) -> int:
        return self.grid.total - len(self.cpu)

    def cpu_by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {layer: [] for layer in self.grid.layers}
        for key in sorted(self.cpu):
            out[key.layer].append(key.expert)
        return out

    def format(self) -> str:
        """The plan for people: the choice, the cost figures, the predictions."""
        routing = "uniform routing" if self.uniform else "the routing trace's frequencies"
        lines = [
            f"hybrid placement ({self.how}): {len(self.cpu)} of {self.grid.total} experts on "
            f"the CPU, {self.device_experts} on the device behind {self.slots} slots "
            f"({self.grid.describe()})",
            f"costs: {self.costs.describe()}",
            f"predicted expert seconds per token ({routing}; attention and the rest, alike in "
            "every placement, left out):",
        ]
        best = min(self.predicted.values())
        for name, seconds in self.predicted.items():
            mark = "  <- fastest" if seconds <= best * (1 + TIE) else ""
            lines.append(f"  {name:<11} {seconds * 1e3:9.3f} ms{mark}")
        lines.append("CPU experts by layer:")
        for layer, experts in self.cpu_by_layer().items():
            lines.append(f"  layer {layer}: {_ranges(experts) or '-'}")
        return "\n".join(lines)


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts: list[str] = []
    for i in ids:
        if parts and parts[-1][1] == i - 1:
            parts[-1] = (parts[-1][0], i)
        else:
            parts.append((i, i))  # type: ignore[arg-type]
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)  # type: ignore[misc]


class CostModel:
    """Expected expert seconds per decode token of a placement (the module's docstring)."""

    def __init__(
        self, routing: Routing, costs: HybridCosts, slots: int, compute_on_miss: bool = False
    ) -> None:
        self.routing, self.costs, self.slots = routing, costs, slots
        self.compute_on_miss = compute_on_miss
        self.keys = list(routing.grid.keys())
        self.rates = np.array([routing.rates[k] for k in self.keys], dtype=np.float64)
        self.index = {key: i for i, key in enumerate(self.keys)}

    def seconds(self, cpu: frozenset[ExpertKey]) -> float:
        """Per token; inf when experts are left for the device and it has no slot."""
        on_cpu = np.zeros(len(self.keys), dtype=bool)
        on_cpu[[self.index[k] for k in cpu]] = True
        if self.slots == 0 and not on_cpu.all():
            return math.inf
        hit = che_hit_rates(np.where(on_cpu, 0.0, self.rates), self.slots)
        e, k, c = self.routing.grid.experts, self.routing.top_k, self.costs
        total = 0.0
        for i in range(len(self.routing.grid.layers)):
            rates, cpu_l, hit_l = (a[i * e : (i + 1) * e] for a in (self.rates, on_cpu, hit))
            share = float(rates[cpu_l].sum()) / k
            device = float(rates[~cpu_l].sum())
            miss = float((rates[~cpu_l] * (1 - hit_l[~cpu_l])).sum()) / device if device else 0.0
            total += _layer_seconds(k, round(share, 12), round(miss, 12), c, self.compute_on_miss)
        return total


def che_hit_rates(rates: np.ndarray, slots: int) -> np.ndarray:
    """Each item's hit rate in an LRU cache of `slots` under independent requests of these
    rates (Che's approximation: 1 - exp(-rate * T), T the cache's characteristic time, where
    the expected occupancy equals the slots). Items of rate 0 are never asked for."""
    live = rates > 0
    if slots >= int(live.sum()):
        return np.ones_like(rates)
    if slots <= 0:
        return np.zeros_like(rates)

    def filled(t: float) -> float:
        return float((1.0 - np.exp(-rates[live] * t)).sum())

    lo, hi = 0.0, 1.0
    while filled(hi) < slots:
        hi *= 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if filled(mid) < slots else (lo, mid)
    return np.where(live, 1.0 - np.exp(-rates * hi), 1.0)


@lru_cache(maxsize=4096)
def _layer_seconds(k: int, share: float, miss: float, c: HybridCosts, on_miss: bool) -> float:
    """Expected seconds of one layer: j ~ binomial(k, share) experts on the CPU, then of the
    k - j on the device, m ~ binomial(k - j, miss) missing."""
    total = 0.0
    for j in range(k + 1):
        pj = math.comb(k, j) * share**j * (1 - share) ** (k - j)
        for m in range(k - j + 1):
            pm = math.comb(k - j, m) * miss**m * (1 - miss) ** (k - j - m)
            if pj * pm > 0:
                total += pj * pm * _call_seconds(j, k - j - m, m, c, on_miss)
    return total


def _call_seconds(cpu: int, resident: int, missing: int, c: HybridCosts, on_miss: bool) -> float:
    host = cpu * c.cpu_expert_s + (resident * c.device_expert_s if c.device_is_host else 0.0)
    device = 0.0 if c.device_is_host else resident * c.device_expert_s
    link, arrived = 0.0, 0
    for _ in range(missing):
        if on_miss and host + c.cpu_expert_s < link + c.link_expert_s:
            host += c.cpu_expert_s
        else:
            link += c.link_expert_s
            arrived += 1
    return max(host, link, device) + arrived * c.device_expert_s


def plan_hybrid(
    routing: Routing,
    costs: HybridCosts,
    slots: int,
    cpu_experts: int | str | None = None,
    cpu_moe_layers: int | None = None,
    compute_on_miss: bool = False,
) -> HybridPlan:
    """The placement asked for: `cpu_experts` "auto" (the cost model's best CPU set), N (the
    N least used experts of every MoE layer), `cpu_moe_layers` N (every expert of the first N
    MoE layers, llama.cpp's --n-cpu-moe), or neither (cache only). `slots`: the device slots
    the memory budget holds; a plan uses no more than its device experts need."""
    grid = routing.grid
    model = CostModel(routing, costs, slots, compute_on_miss)
    every = frozenset(grid.keys())
    if cpu_experts is not None and cpu_moe_layers is not None:
        raise ValueError(
            f"give cpu_experts ({cpu_experts!r}) or cpu_moe_layers ({cpu_moe_layers}), not both"
        )
    if cpu_moe_layers is not None:
        cpu, how = _first_layers(grid, cpu_moe_layers), f"first {cpu_moe_layers} MoE layers"
    elif cpu_experts == "auto":
        cpu, how = best_cpu_set(model, routing.order()), "auto"
    elif cpu_experts is None:
        cpu, how = frozenset(), "none"
    else:
        cpu, how = _per_layer(routing, cpu_experts), f"{cpu_experts} per layer"
    if slots == 0 and cpu != every:
        raise ValueError(
            f"the memory budget holds no expert slot, so every expert must be on the CPU; "
            f"the plan ({how}) leaves {grid.total - len(cpu)} on the device"
        )
    predicted = {
        "cpu only": model.seconds(every),
        "cache only": model.seconds(frozenset()),
        "this plan": model.seconds(cpu),
    }
    used = min(slots, grid.total - len(cpu))
    return HybridPlan(grid, cpu, used, how, predicted, costs, routing.uniform)


def best_cpu_set(model: CostModel, order: Sequence[ExpertKey]) -> frozenset[ExpertKey]:
    """The first n of `order` for the n the cost model finds fastest (ties: the smaller n)."""
    total, step = len(order), len(model.routing.grid.layers)
    times: dict[int, float] = {}

    def at(n: int) -> float:
        if n not in times:
            times[n] = model.seconds(frozenset(order[:n]))
        return times[n]

    coarse = _fewest_fastest(range(0, total + 1, step), at)
    best = _fewest_fastest(range(max(0, coarse - step), min(total, coarse + step) + 1), at)
    return frozenset(order[:best])


def _fewest_fastest(counts: range, seconds: Callable[[int], float]) -> int:
    fastest = min(seconds(n) for n in counts)
    return min(n for n in counts if seconds(n) <= fastest * (1 + TIE))


def _first_layers(grid: ExpertGrid, n: int) -> frozenset[ExpertKey]:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(grid.layers):
        raise ValueError(
            f"cpu_moe_layers (--cpu-moe) must be an integer from 0 to the {len(grid.layers)} "
            f"MoE layers, got {n!r}"
        )
    return frozenset(k for layer in grid.layers[:n] for k in grid.layer_keys(layer))


def _per_layer(routing: Routing, n: int | str) -> frozenset[ExpertKey]:
    grid = routing.grid
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= grid.experts:
        raise ValueError(
            f"cpu_experts (--cpu-experts) must be 'auto' or an integer from 0 to the "
            f"{grid.experts} experts of a layer, got {n!r}"
        )
    order = routing.order()
    return frozenset(
        key for layer in grid.layers for key in [k for k in order if k.layer == layer][:n]
    )
