"""Replay a routing trace through an expert cache and count hits and misses.

Rules, those of the device cache at batch 1:
  * a hit is an expert already resident when the token needs it;
  * a token's experts in one layer are looked up together: the policy hears of all of them
    first, and none of them is evicted to make room for another of the same token (if a
    token needs more experts than the cache holds, the ones that find no evictable slot run
    without being cached; only a prompt pass can do that);
  * prompt passes fill the cache but count neither hits nor misses; with
    `prompt_fills=False` they are left out altogether, so the cache starts empty at the first
    decode pass, the convention of the reference figures in `../shared/data/README.md`;
  * by default each layer has its own cache of `capacity` experts; with `global_cache` one
    cache of `capacity * num_layers` experts serves every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from offload_rt.analysis.policies import make_policy
from offload_rt.analysis.traces import RoutingTrace
from offload_rt.experts.policies import CachePolicy
from offload_rt.model.moe import ExpertKey


@dataclass(frozen=True)
class SimResult:
    policy: str  # name in POLICIES
    capacity: int  # experts per layer (a global cache holds capacity * num_layers)
    global_cache: bool  # one cache for all layers instead of one per layer
    prompt_fills: bool  # prompt passes filled the cache (False: they were left out)
    hits: int  # decode-pass expert uses that found the expert resident
    misses: int  # decode-pass expert uses that had to load it
    evictions: int  # residents dropped to make room during decode passes
    prompt_hits: int = 0  # prompt-pass uses that found the expert resident (not in hits)
    prompt_misses: int = 0  # prompt-pass uses that loaded it: with hits and misses, the
    # totals of the runtime's own counters over the same run

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "hit_rate": self.hit_rate}


class ExpertCaches:
    """Resident sets, one per layer or one for all, and the policy that evicts from them."""

    def __init__(self, size: int, global_cache: bool, policy: CachePolicy) -> None:
        self.size = size  # experts per cache
        self.global_cache = global_cache
        self.policy = policy
        self.resident: dict[int, set[ExpertKey]] = {}  # cache id -> experts in it
        self.evictions = 0

    def _cache(self, key: ExpertKey) -> set[ExpertKey]:
        return self.resident.setdefault(-1 if self.global_cache else key.layer, set())

    def lookup(self, keys: Sequence[ExpertKey], now: int) -> int:
        """Look up one token's experts of one layer together; returns how many were hits."""
        for key in keys:
            self.policy.on_access(key, now)
        missing = [k for k in keys if k not in self._cache(k)]
        for key in missing:
            self._admit(key, frozenset(keys), now)
        return len(keys) - len(missing)

    def _admit(self, key: ExpertKey, protected: frozenset[ExpertKey], now: int) -> None:
        cache = self._cache(key)
        if len(cache) >= self.size:
            candidates = [k for k in cache if k not in protected]
            if not candidates:
                return  # every slot holds this token's experts: run it uncached
            victim = self.policy.choose_victim(candidates, now)
            if victim not in candidates:
                raise RuntimeError(f"policy {self.policy.name} chose {victim}, not a candidate")
            cache.remove(victim)
            self.policy.on_evict(victim, now)
            self.evictions += 1
        cache.add(key)


def simulate(
    trace: RoutingTrace,
    capacity: int,
    policy: str,
    global_cache: bool = False,
    prompt_fills: bool = True,
) -> SimResult:
    """Replay `trace` through caches of `capacity` experts per layer under `policy`."""
    if capacity < 1:
        raise ValueError(f"cache capacity must be at least 1 expert per layer, got {capacity}")
    if not prompt_fills:
        trace = trace.without_prompts()
    size = capacity * trace.num_layers if global_cache else capacity
    caches = ExpertCaches(size, global_cache, make_policy(policy, trace))
    hits = misses = evictions = prompt_hits = prompt_misses = 0
    for index, layer, keys in trace.steps():
        before = caches.evictions
        found = caches.lookup(keys, trace.step(index, layer))
        if trace.is_prompt(index):
            prompt_hits, prompt_misses = prompt_hits + found, prompt_misses + len(keys) - found
            continue
        hits, misses = hits + found, misses + len(keys) - found
        evictions += caches.evictions - before
    return SimResult(
        policy,
        capacity,
        global_cache,
        prompt_fills,
        hits,
        misses,
        evictions,
        prompt_hits,
        prompt_misses,
    )


def _column(result: SimResult) -> str:
    return result.policy + (" global" if result.global_cache else "")


def format_table(results: Sequence[SimResult]) -> str:
    """Hit rates as a text table: one row per capacity K, one column per policy (and mode),
    in the order the results first name them."""
    columns = list(dict.fromkeys(_column(r) for r in results))
    rates = {(r.capacity, _column(r)): r.hit_rate for r in results}
    width = max([7, *(len(c) for c in columns)])
    lines = ["K".rjust(3) + "".join(c.rjust(width + 2) for c in columns)]
    for k in sorted({r.capacity for r in results}):
        cells = [rates.get((k, c)) for c in columns]
        text = ["-" if v is None else f"{v:.3f}" for v in cells]
        lines.append(str(k).rjust(3) + "".join(t.rjust(width + 2) for t in text))
    return "\n".join(lines)
