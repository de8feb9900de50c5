"""Which expert sits in which device slot: the replacement policy's bookkeeping and the cache
counters.

Pure bookkeeping, no tensors: the store owns the memory, this class decides which slot an
expert goes to and, by its `CachePolicy` (`policies.py`, shared with the simulator), which
resident expert leaves to make room.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Iterable
from dataclasses import asdict, dataclass

from offload_rt.experts.policies import LRU
from offload_rt.model.moe import ExpertKey


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

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._order

    def lookup(self, key: ExpertKey, now: int = 0) -> int | None:
        """Count one use of `key`: a hit (returns its slot, now most recent) or a miss (None)."""
        self.policy.on_access(key, now)
        slot = self._order.get(key)
        if slot is None:
            self.stats.misses += 1
            return None
        self._order.move_to_end(key)
        self.stats.hits += 1
        return slot

    def slot_of(self, key: ExpertKey) -> int:
        return self._order[key]

    def touch(self, key: ExpertKey) -> None:
        """Make a resident `key` the most recent without counting a use (it is predicted)."""
        if key in self._order:
            self._order.move_to_end(key)
            self.policy.touch(key)

    def demote(self, key: ExpertKey) -> None:
        """Make a resident `key` the first to go (it was loaded for a use that did not come)."""
        if key in self._order:
            self._order.move_to_end(key, last=False)
            self.policy.demote(key)

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
            if victim is None:
                candidates = [k for k in self._order if k not in pinned]
                if not candidates:
                    return None
                victim = self.policy.choose_victim(candidates, now)
            slot = self._order.pop(victim)
            self.policy.on_evict(victim, now)
            self.stats.evictions += 1
        self._order[key] = slot
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
