"""The simulator's policies by name: the runtime's own (`experts/policies.py`, set up for a
trace's shape) and Belady's optimum, which reads the trace's future and so is only a bound."""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Callable, Sequence

from offload_rt.analysis.traces import RoutingTrace
from offload_rt.experts.policies import RUNTIME_POLICIES, CachePolicy, runtime_policy
from offload_rt.model.moe import ExpertKey


class Belady:
    """Optimal replacement (Belady 1966): evict the resident expert whose next use is
    farthest in the future, read from the trace. The upper bound for any policy."""

    name = "belady"

    def __init__(self, trace: RoutingTrace) -> None:
        self._uses: dict[ExpertKey, list[int]] = defaultdict(list)  # key -> steps, ascending
        for index, layer, keys in trace.steps():
            for key in keys:
                self._uses[key].append(trace.step(index, layer))

    def on_access(self, key: ExpertKey, now: int) -> None:
        pass

    def on_evict(self, key: ExpertKey, now: int) -> None:
        pass

    def next_use(self, key: ExpertKey, now: int) -> float:
        uses = self._uses.get(key, [])
        i = bisect.bisect_right(uses, now)
        return uses[i] if i < len(uses) else math.inf

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        return min(candidates, key=lambda k: (-self.next_use(k, now), k))


PolicyFactory = Callable[[RoutingTrace], CachePolicy]


def _runtime(name: str) -> PolicyFactory:
    return lambda trace: runtime_policy(name, trace.num_layers)


POLICIES: dict[str, PolicyFactory] = {
    **{name: _runtime(name) for name in RUNTIME_POLICIES},
    Belady.name: Belady,
}


def make_policy(name: str, trace: RoutingTrace) -> CachePolicy:
    """The policy registered as `name`, set up for `trace`."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown cache policy {name!r}; choose from {', '.join(POLICIES)}")
    return factory(trace)
