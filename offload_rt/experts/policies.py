"""Expert-cache replacement policies, one implementation each for the runtime's device cache
(`SlotCache`) and the trace simulator (`offload_rt.analysis.cachesim.simulate`).

Every policy sees the same three calls from both:
  * `on_access(key, now)` for every expert a step uses, hit or miss, before any eviction of
    that step, so a policy knows the whole set the current token needs in this layer;
  * `choose_victim(candidates, now)` when a miss finds its cache full: `candidates` (never
    empty, in no set order) are the residents the current token does not use; it returns one;
  * `on_evict(key, now)` after the victim leaves.
`now` is the step index, `pass index * num_layers + layer`: it orders every (pass, layer) of a
trace, so per-layer and global caches share one clock. Ties go to the smallest key, so every
run of a policy on a trace gives the same figures whatever the order of the candidates.

`runtime_policy` makes one for a model; the simulator's registry (`analysis/policies.py`)
adds Belady's optimum, which reads the trace's future.
The runtime also calls `touch` (a prefetch names a resident expert: most recent, no use
counted) and `demote` (a prefetched expert went unused: first to go among equals).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

from offload_rt.model.moe import ExpertKey

HALF_LIFE_TOKENS = 64.0  # decay of past uses: long against LRU's memory of a few tokens, short
# against a generation of hundreds of tokens, so estimates follow the text's drift
PRIOR_WEIGHT = 1.0  # pseudo-observations of the frequency prior in the transition estimate


class CachePolicy(Protocol):
    name: str

    def on_access(self, key: ExpertKey, now: int) -> None: ...

    def on_evict(self, key: ExpertKey, now: int) -> None: ...

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey: ...


class LRU:
    """Least recently used. A counter, not `now`, orders uses, so of two experts one token
    looked up together the one looked up first is the older."""

    name = "lru"

    def __init__(self) -> None:
        self._tick = 0
        self._low = 0  # below every use: where demoted experts go
        self._last: dict[ExpertKey, int] = {}

    def on_access(self, key: ExpertKey, now: int) -> None:
        self._tick += 1
        self._last[key] = self._tick

    def on_evict(self, key: ExpertKey, now: int) -> None:
        pass

    def touch(self, key: ExpertKey) -> None:
        self._tick += 1
        self._last[key] = self._tick

    def demote(self, key: ExpertKey) -> None:
        self._low -= 1
        self._last[key] = self._low  # older than any use

    def last_use(self, key: ExpertKey) -> int:
        return self._last.get(key, 0)

    def rank(self, key: ExpertKey) -> tuple:
        """The least goes first; it changes only by `on_access`, `touch` and `demote`."""
        return (self._last.get(key, 0), key)

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        return min(candidates, key=self.rank)


class LFU(LRU):
    """Least frequently used, counting every use since the trace began (counts survive
    eviction: an expert's popularity does not reset when it leaves the cache); ties to LRU."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self._count: dict[ExpertKey, int] = defaultdict(int)

    def on_access(self, key: ExpertKey, now: int) -> None:
        super().on_access(key, now)
        self._count[key] += 1

    def rank(self, key: ExpertKey) -> tuple:
        return (self._count.get(key, 0), self.last_use(key), key)


class Decayed:
    """Counts that halve every `half_life` time units. Each is stored multiplied by
    2 ** (time / half_life), so an update costs no exponential and stored counts rank as the
    decayed ones do; all are shrunk (rebased) before that factor could overflow a float."""

    REBASE_HALF_LIVES = 256.0  # 2 ** 256 is far inside the float range

    def __init__(self, half_life: float) -> None:
        self.half_life = half_life
        self.origin = 0.0  # the time at which a stored count equals its decayed value
        self.raw: dict[object, float] = defaultdict(float)  # item -> count * scale(now)

    def scale(self, now: float) -> float:
        return 2.0 ** ((now - self.origin) / self.half_life)

    def add(self, item: object, now: float) -> None:
        if now - self.origin > self.REBASE_HALF_LIVES * self.half_life:
            self._rebase(now)
        self.raw[item] += self.scale(now)

    def get(self, item: object, now: float) -> float:
        return self.raw.get(item, 0.0) / self.scale(now)

    def _rebase(self, now: float) -> None:
        shrink = 1.0 / self.scale(now)
        for item in self.raw:
            self.raw[item] *= shrink
        self.origin = now


class LRFU(LRU):
    """Least recently/frequently used (Lee et al., IEEE Trans. Computers 2001): each use adds 1
    to a score that halves every `half_life` tokens; the lowest score leaves. Between LRU (a
    short half-life) and LFU (an infinite one)."""

    name = "lrfu"

    def __init__(self, num_layers: int, half_life: float = HALF_LIFE_TOKENS) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.counts = Decayed(half_life)  # ExpertKey -> decayed uses; subclasses add more items

    def token(self, now: int) -> int:
        return now // self.num_layers

    def on_access(self, key: ExpertKey, now: int) -> None:
        super().on_access(key, now)
        self.counts.add(key, self.token(now))

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        raw = self.counts.raw
        return min(candidates, key=lambda k: (raw.get(k, 0.0), self._last.get(k, 0), k))


class Markov(LRFU):
    """Next-token prediction from the current token's experts (this package's own policy).

    Why: in Mixtral only about a third of a token's experts in a layer repeat at the next
    token, so recency alone (LRU) is close to random, and the optimum (Belady) evicts the expert
    needed last. Routing is correlated from one token to the next: some experts tend to follow
    others. Per layer this policy counts, with decay (half-life `HALF_LIFE_TOKENS`, so the
    counts follow the text's drift), how often expert e is used at the token after one that
    used expert a. On a miss it evicts the candidate least likely to be needed at the layer's
    next token, given the experts its latest token used:
        p(e) = (sum_a pairs[a, e] + w * rate(e)) / (sum_a follows[a] + w)
    where a runs over those experts, follows[a] counts the tokens after one that used a, and
    rate(e) is e's decayed uses per token (the LRFU score over decayed tokens), a prior that
    weighs as `w` = `PRIOR_WEIGHT` observations and decides while the counts are few. Ties go
    to LRFU, then LRU. Everything is learned online from the uses seen so far; it never reads
    the future. In a global cache the candidates span layers, and p(e) is comparable across
    them: each is the chance of being needed at that layer's next token.
    """

    name = "markov"

    def __init__(
        self, num_layers: int, half_life: float = HALF_LIFE_TOKENS, prior: float = PRIOR_WEIGHT
    ) -> None:
        super().__init__(num_layers, half_life)
        self.prior = prior
        # in self.counts beside the LRFU scores: ("pair", layer, a, e), e used at the token
        # after one that used a; ("follows", layer, a), tokens after one that used a;
        # ("tokens", layer), tokens that used the layer
        self._token: dict[int, int] = {}  # layer -> token of its latest use
        self._latest: dict[int, list[int]] = defaultdict(list)  # layer -> experts of that token
        self._before: dict[int, tuple[int, ...]] = {}  # layer -> experts of the token before

    def on_access(self, key: ExpertKey, now: int) -> None:
        super().on_access(key, now)
        t, layer = self.token(now), key.layer
        if self._token.get(layer) != t:
            self._start_token(layer, t)
        for a in self._before[layer]:
            self.counts.add(("pair", layer, a, key.expert), t)
        self._latest[layer].append(key.expert)

    def _start_token(self, layer: int, t: int) -> None:
        self._before[layer] = tuple(self._latest[layer])
        self._latest[layer] = []
        self._token[layer] = t
        self.counts.add(("tokens", layer), t)
        for a in self._before[layer]:
            self.counts.add(("follows", layer, a), t)

    def next_use_probability(self, key: ExpertKey, now: int) -> float:
        """p(e) of the class docstring for the expert `key` at step `now`."""
        return self._probability(key, self.prior * self.counts.scale(self.token(now)))

    def _probability(self, key: ExpertKey, prior: float) -> float:
        # prior: w observations at the scale of the stored counts, which then need no decaying
        raw, layer = self.counts.raw, key.layer
        given = self._latest[layer]
        pairs = sum(raw.get(("pair", layer, a, key.expert), 0.0) for a in given)
        follows = sum(raw.get(("follows", layer, a), 0.0) for a in given)
        tokens = raw.get(("tokens", layer), 0.0)
        rate = raw.get(key, 0.0) / tokens if tokens else 0.0
        return (pairs + prior * rate) / (follows + prior)

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        raw, prior = self.counts.raw, self.prior * self.counts.scale(self.token(now))

        def rank(k: ExpertKey) -> tuple[float, float, int, ExpertKey]:
            return (self._probability(k, prior), raw.get(k, 0.0), self._last.get(k, 0), k)

        return min(candidates, key=rank)


RUNTIME_POLICIES = ("lru", "lfu", "lrfu", "markov")  # those that need no future knowledge
DEFAULT_POLICY = "markov"  # the best of these on the real Mixtral trace (bench_cache_policies.py)


def runtime_policy(name: str, num_layers: int) -> LRU:
    """A policy for a model's device cache; `num_layers`: its MoE layers (the policy's clock
    ticks once per MoE layer call)."""
    if name == LRU.name:
        return LRU()
    if name == LFU.name:
        return LFU()
    if name == LRFU.name:
        return LRFU(num_layers)
    if name == Markov.name:
        return Markov(num_layers)
    raise ValueError(
        f"cache_policy {name!r} is not one the runtime runs; choose from {RUNTIME_POLICIES}"
        + (" (belady needs the future: it is the simulator's bound)" if name == "belady" else "")
    )


def ranks_victims(policy: object) -> bool:
    """Whether `policy` evicts the candidate of least `rank` (lru, lfu): a rank that changes
    only when the policy is told of a use, so a cache can keep its residents in a heap by it
    instead of ranking them all at every eviction."""
    return getattr(type(policy), "choose_victim", None) is LRU.choose_victim
