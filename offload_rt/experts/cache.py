"""Which expert sits in which device slot: the replacement policy's bookkeeping and the cache
counters.

Pure bookkeeping, no tensors: the store owns the memory, this class decides which slot an
expert goes to and, by its `CachePolicy` (`policies.py`, shared with the simulator), which
resident expert leaves to make room. Under a policy that ranks its victims (lru, lfu) the
residents are kept in a heap by rank, so an eviction costs O(log capacity) amortised instead
of ranking every resident; the other policies see every candidate.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass

from offload_rt.experts.policies import LRU, ranks_victims
from offload_rt.model.moe import ExpertKey

HEAP_SLACK = 4  # rebuild the rank heap once it holds this many entries per slot (stale ones)


@dataclass
class CacheStats:
    hits: int = 0  # expert uses that found the expert resident
    misses: int = 0  # expert uses that had to load it
    evictions: int = 0  # resident experts dropped to make room
    bytes_loaded: int = 0  # bytes copied into device slots
    resident: int = 0  # experts resident now
    resident_max: int = 0  # most experts ever resident at once

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class SlotCache:
    """`capacity` slots holding experts (`_order`: least recently used first, for the
    prefetcher's own choices); `policy` picks the victim when none is preferred.
    `now`: the policy's clock, one tick per (forward pass, MoE layer)."""

    def __init__(self, capacity: int, policy: LRU | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1 expert, got {capacity}")
        self.capacity = capacity
        self.policy = policy if policy is not None else LRU()
        self._order: OrderedDict[ExpertKey, int] = OrderedDict()
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first
        self.stats = CacheStats()
        self._heap = RankHeap(self.policy, capacity) if ranks_victims(self.policy) else None
        # set by an owner whose every expert fits (`LocalExpertBackend`): nothing is ever
        # evicted, so the policy, which only chooses victims, is not told of uses (its upkeep,
        # LRFU decay and Markov pair counts, took ~5% of a CPU int4 step, all resident)
        self.keeps_all = False

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._order

    def lookup(self, key: ExpertKey, now: int = 0) -> int | None:
        """Count one use of `key`: a hit (returns its slot, now most recent) or a miss (None)."""
        if not self.keeps_all:
            self.policy.on_access(key, now)
        slot = self._order.get(key)
        if slot is None:
            self.stats.misses += 1
            return None
        self._order.move_to_end(key)
        self.stats.hits += 1
        if self._heap is not None and not self.keeps_all:
            self._heap.push(key, self._order)
        return slot

    def count_hits(self, keys: list[ExpertKey]) -> None:
        """`lookup` of each of `keys` in turn, every one resident, where the cache keeps all
        (the policy is then not told of uses): each one a hit, now the most recent."""
        if not self.keeps_all:
            raise ValueError("count_hits is for a cache that keeps every expert")
        move = self._order.move_to_end
        for key in keys:
            move(key)  # a KeyError for one not resident
        self.stats.hits += len(keys)

    def slot_of(self, key: ExpertKey) -> int:
        return self._order[key]

    def touch(self, key: ExpertKey) -> None:
        """Make a resident `key` the most recent without counting a use (it is predicted)."""
        if key in self._order:
            self._order.move_to_end(key)
            self.policy.touch(key)
            if self._heap is not None:
                self._heap.push(key, self._order)

    def demote(self, key: ExpertKey) -> None:
        """Make a resident `key` the first to go (it was loaded for a use that did not come)."""
        if key in self._order:
            self._order.move_to_end(key, last=False)
            self.policy.demote(key)
            if self._heap is not None:
                self._heap.push(key, self._order)

    def acquire(
        self,
        key: ExpertKey,
        pinned: Container[ExpertKey],
        prefer: Iterable[ExpertKey] = (),
        now: int = 0,
    ) -> int | None:
        """A slot for `key`: a free one, else evicting the first resident expert of `prefer`
        not in `pinned`, else the policy's choice among those not in `pinned`; None when
        every slot holds a pinned expert."""
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((k for k in prefer if k in self._order and k not in pinned), None)
            if victim is None and self._heap is not None:
                victim = self._heap.least(self._order, pinned)
            elif victim is None:
                candidates = [k for k in self._order if k not in pinned]
                victim = self.policy.choose_victim(candidates, now) if candidates else None
            if victim is None:
                return None
            slot = self._order.pop(victim)
            self.policy.on_evict(victim, now)
            self.stats.evictions += 1
        self._order[key] = slot
        if self._heap is not None:
            self._heap.push(key, self._order)
        self.stats.resident = len(self._order)
        self.stats.resident_max = max(self.stats.resident_max, self.stats.resident)
        return slot

    def discard(self, key: ExpertKey) -> None:
        """Forget `key` (its load failed): its slot becomes free."""
        slot = self._order.pop(key, None)
        if slot is not None:
            self._free.append(slot)
            self.stats.resident = len(self._order)

    def resident_keys(self) -> list[ExpertKey]:
        """Least recently used first."""
        return list(self._order)

    def residents(self) -> Iterator[ExpertKey]:
        """`resident_keys` lazily: valid until the cache next changes."""
        return iter(self._order)


class RankHeap:
    """The residents by their policy's `rank`, least first (lru, lfu: `ranks_victims`).

    An entry is pushed whenever a resident's rank may have changed; one is stale once its key
    has left or its rank has changed since, and is dropped when it comes to the top. Rebuilt
    from the residents when stale entries pile up, so a push costs O(log capacity) amortised.
    """

    def __init__(self, policy: LRU, capacity: int) -> None:
        self.policy = policy
        self.limit = HEAP_SLACK * capacity
        self._heap: list[tuple] = []  # (rank..., key)

    def push(self, key: ExpertKey, residents: Mapping[ExpertKey, int]) -> None:
        if len(self._heap) >= self.limit:
            self._heap = [self.policy.rank(k) for k in residents]
            heapq.heapify(self._heap)
        else:
            heapq.heappush(self._heap, self.policy.rank(key))

    def least(
        self, residents: Mapping[ExpertKey, int], pinned: Container[ExpertKey]
    ) -> ExpertKey | None:
        """The resident of least rank not in `pinned` (what `choose_victim` would pick among
        them); None if every resident is pinned."""
        held, victim = [], None
        while self._heap:
            entry = heapq.heappop(self._heap)
            key = entry[-1]
            if key not in residents or entry != self.policy.rank(key):
                continue
            if key in pinned:
                held.append(entry)
                continue
            victim = key
            break
        for entry in held:
            heapq.heappush(self._heap, entry)
        return victim
