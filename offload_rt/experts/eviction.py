"""Which slot a load takes: the rules the backend lays over the cache's policy, and the
policy's clock.

The `SlotCache`'s `CachePolicy` chooses among the residents a load may evict; the rules here
say which it may not (the call's own experts, loads in flight, and for a prefetch the predicted
experts, the layer running and the first MoE layer) and which go first. No guess covers the
first MoE layer, so its experts come back only by having stayed resident: with prefetch on,
every load evicts other layers' experts before them.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass

from offload_rt.experts.cache import SlotCache
from offload_rt.grid import ExpertGrid
from offload_rt.model.moe import ExpertKey


@dataclass(frozen=True)
class Guard:
    """Experts a new load may not evict: some keys, and every expert of some layers."""

    keys: Container[ExpertKey]
    layers: Container[int] = ()

    def __contains__(self, key: object) -> bool:
        return key in self.keys or (isinstance(key, ExpertKey) and key.layer in self.layers)


class Eviction:
    def __init__(self, cache: SlotCache, grid: ExpertGrid, prefetching: bool = False) -> None:
        self.cache = cache
        self.grid = grid
        self.prefetching = prefetching  # guesses bring back every layer's experts but the first
        self.passes = -1  # forward passes begun (a call for the first MoE layer begins one)
        self.now = 0  # the cache policy's clock: passes x MoE layers + the layer's ordinal

    def tick(self, layer: int) -> None:
        """A call of MoE layer `layer` begins: the clock moves to it."""
        if layer == self.grid.first_layer:
            self.passes += 1
        self.now = max(self.passes, 0) * len(self.grid.layers) + self.grid.ordinal(layer)

    def tick_pass(self) -> None:
        """A whole forward pass's calls, each MoE layer's `tick` in turn: the clock at the last."""
        self.passes += 1
        self.now = max(self.passes, 0) * len(self.grid.layers) + len(self.grid.layers) - 1

    def lookup(self, key: ExpertKey) -> int | None:
        """Count one use of `key` now: its slot (a hit), or None (a miss)."""
        return self.cache.lookup(key, self.now)

    def demand_slot(
        self, key: ExpertKey, pinned: set[ExpertKey], in_flight: set[ExpertKey]
    ) -> int | None:
        """A slot for a load a layer waits for, evicting neither `pinned` (the call's experts
        not yet run) nor `in_flight`; None while every candidate is one of them."""
        prefer = self._cheap_victims()
        return self.cache.acquire(key, Guard(pinned | in_flight), prefer=prefer, now=self.now)

    def prefetch_slots(
        self,
        layer: int,
        missing: list[ExpertKey],
        wanted: set[ExpertKey],
        in_flight: set[ExpertKey],
    ) -> Iterator[tuple[ExpertKey, int]]:
        """Slots for the prefetch loads of `missing` (of `layer`, in order), until one finds
        none. Never evicted: a `wanted` (predicted) expert, one in flight, one of the layer
        now running or of the first MoE layer. The layer's own residents the guess leaves out
        go first: the layer is about to run without them."""
        stale = [k for k in self.cache.resident_keys() if k.layer == layer and k not in wanted]
        running = self.grid.previous_layer(layer)
        guard = Guard(in_flight | wanted, layers=(self.grid.first_layer, running))
        for key in missing:
            slot = self.cache.acquire(key, guard, prefer=stale, now=self.now)
            if slot is None:
                return
            yield key, slot

    def _cheap_victims(self) -> Iterable[ExpertKey]:
        """With prefetch on, residents of layers past the first, least recent first (lazily:
        the cache takes the first it may evict)."""
        if not self.prefetching:
            return ()
        first = self.grid.first_layer
        return (k for k in self.cache.residents() if k.layer != first)
