"""Speculative prefetch: the model's guesses of a layer's experts turned into loads, and how
the layer's real use then scored them.

The model applies layer L+1's router to the hidden state while layer L runs and hands the
ranked experts to the `PrefetchController` (its `ExpertPrefetcher`), which starts their loads
behind the demand loads, into slots `Eviction.prefetch_slots` gives. When layer L+1 runs,
`settle` scores the guess (`PrefetchTracker`) and drops or demotes the loads it did not use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from offload_rt.experts.cache import SlotCache
from offload_rt.experts.eviction import Eviction
from offload_rt.experts.loads import LoadTable
from offload_rt.model.interface import PREDICT_FROM
from offload_rt.model.moe import ExpertKey


@dataclass
class PrefetchStats:
    predicted_uses: int = 0  # expert uses in layer calls that had a prediction
    recalled: int = 0  # of those, uses of an expert the prediction named
    issued: int = 0  # prefetch loads queued
    cancelled: int = 0  # of those, dropped before they started: no bytes moved
    used: int = 0  # prefetch loads whose expert the layer then used
    on_time: int = 0  # of those, loads finished before the layer asked for the expert
    wasted: int = 0  # prefetch loads that moved an expert the layer did not use

    def as_dict(self) -> dict[str, int | float]:
        scored = self.used + self.wasted
        return {
            "prefetch_recall": _ratio(self.recalled, self.predicted_uses),
            "prefetch_loads": self.issued - self.cancelled,
            "prefetch_used": self.used,
            "prefetch_wasted": self.wasted,
            "prefetch_cancelled": self.cancelled,
            "prefetch_precision": _ratio(self.used, scored),
            "prefetch_on_time": _ratio(self.on_time, self.used),
        }


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


class PrefetchTracker:
    def __init__(self) -> None:
        self.stats = PrefetchStats()
        self._predicted: dict[int, set[int]] = {}  # layer -> experts named since its last call
        self._issued: dict[int, dict[ExpertKey, Future]] = {}  # layer -> its prefetch loads

    def predicted(self, layer: int, ranked: Iterable[int]) -> None:
        self._predicted.setdefault(layer, set()).update(ranked)

    def issued(self, key: ExpertKey, load: Future) -> None:
        self._issued.setdefault(key.layer, {})[key] = load
        self.stats.issued += 1

    def pending(self, layer: int) -> dict[ExpertKey, Future]:
        """The prefetch loads of `layer` not yet scored by a call of that layer."""
        return dict(self._issued.get(layer, {}))

    def dropped(self, key: ExpertKey) -> None:
        """A prefetch load of `key` was cancelled before it started (a newer prediction)."""
        self._issued.get(key.layer, {}).pop(key, None)
        self.stats.cancelled += 1

    def settle(self, layer: int, used: set[ExpertKey]) -> list[tuple[ExpertKey, Future]]:
        """Score the prediction and the prefetch loads of `layer` against the experts its
        call uses; returns the loads the call did not use, for the caller to cancel or count
        (`unused`)."""
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            self.stats.predicted_uses += len(used)
            self.stats.recalled += sum(key.expert in predicted for key in used)
        unused = []
        for key, load in self._issued.pop(layer, {}).items():
            if key in used:
                self.stats.used += 1
                self.stats.on_time += _succeeded(load)
            else:
                unused.append((key, load))
        return unused

    def unused(self, cancelled: bool) -> None:
        if cancelled:
            self.stats.cancelled += 1
        else:
            self.stats.wasted += 1


def _succeeded(load: Future) -> bool:
    return load.done() and not load.cancelled() and load.exception() is None


class PrefetchController:
    """The model's `ExpertPrefetcher`: loads for its guesses, scored when their layer runs.
    `predict_from`: where the model guesses, "attention", "moe" or "both". `skip`: experts
    never loaded (a fixed CPU set): left out of every guess."""

    def __init__(
        self,
        cache: SlotCache,
        eviction: Eviction,
        loads: LoadTable,
        predict_from: str = "both",
        skip: frozenset[ExpertKey] = frozenset(),
    ) -> None:
        if predict_from not in PREDICT_FROM:
            raise ValueError(f"prefetch_from must be one of {PREDICT_FROM}, got {predict_from!r}")
        self.cache = cache
        self.eviction = eviction
        self.loads = loads
        self.predict_from = predict_from
        self.skip = skip
        self.tracker = PrefetchTracker()

    def prefetch(self, layer: int, ranked: Sequence[int], at: str) -> None:
        """The model's guess for `layer` made at `at` ("attention" or "moe"). The early guess
        of "both" fetches only the likelier half of what it names (on the benchmark model a
        token's first choice is right 3 times in 4, its second 1 in 2): a wrong load that has
        started cannot be taken back when the later guess corrects it."""
        early = at == "attention" and self.predict_from == "both"
        if self.skip:
            ranked = [e for e in ranked if ExpertKey(layer, e) not in self.skip]
        self.fetch(layer, ranked, -(-len(ranked) // 2) if early else None)

    def fetch(self, layer: int, ranked: Sequence[int], count: int | None = None) -> None:
        """Start loading the first `count` (None: all) of `ranked` (experts of `layer`, most
        likely first) not resident; cancel queued loads of an earlier guess this one drops."""
        self.tracker.predicted(layer, ranked)
        self.loads.reap()
        named = [ExpertKey(layer, e) for e in ranked]
        wanted = set(named)
        for key, load in self.tracker.pending(layer).items():
            if key not in wanted and self.loads.cancel(key, load):
                self.tracker.dropped(key)  # an earlier prediction this one overrides
        for key in named:
            self.cache.touch(key)
        missing = [key for key in named[:count] if key not in self.cache]
        if not missing:
            return
        in_flight = self.loads.in_flight()
        for key, slot in self.eviction.prefetch_slots(layer, missing, wanted, in_flight):
            self.tracker.issued(key, self.loads.start(key, slot, urgent=False).future)

    def settle(self, layer: int, used: set[ExpertKey]) -> None:
        """`layer` runs with `used`: score its guess; its prefetch loads it did not use are
        cancelled if queued, else made the first to go."""
        for key, load in self.tracker.settle(layer, used):
            cancelled = self.loads.cancel(key, load)
            self.tracker.unused(cancelled)
            if not cancelled:
                self.cache.demote(key)  # loaded for nothing: the first to make room
