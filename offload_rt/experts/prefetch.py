"""Bookkeeping of speculative prefetch: what the model predicted for each layer, which loads
that started, and how the layer's real use then scored them.

The model applies layer L+1's router to the hidden state while layer L runs and hands the
ranked experts to the backend (`LocalExpertBackend.prefetch`), which starts their loads. When
layer L+1 runs, `PrefetchTracker.settle` compares its experts with the prediction.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass

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
