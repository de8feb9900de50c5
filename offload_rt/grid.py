"""Which experts a model has: the MoE layers and their expert counts, and one expert's key.

Every part of the runtime that enumerates experts (placement, the caches, warm-up, traces,
prefetch) asks an `ExpertGrid`; none assumes that MoE layers start at layer 0 or that every
decoder layer has experts (Qwen3-MoE's `mlp_only_layers`, DeepSeek-V3's dense first layers).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple


class ExpertKey(NamedTuple):
    """One expert of one layer. A named tuple, not a dataclass: keys are hashed and compared
    thousands of times a token in the cache and prefetch bookkeeping, and a tuple does both
    in C (3x faster); ordering is (layer, expert) either way."""

    layer: int  # decoder layer index (not the MoE layer's ordinal)
    expert: int  # expert index within the layer

    def __str__(self) -> str:
        return f"layer {self.layer} expert {self.expert}"


@dataclass(frozen=True)
class ExpertGrid:
    layers: tuple[int, ...]  # decoder layers with routed experts, ascending
    experts: int  # routed experts in each of those layers
    _ordinal: dict[int, int] = field(init=False, repr=False, compare=False)
    _next: dict[int, int | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"MoE layers must be distinct and ascending, got {self.layers}")
        if self.layers[0] < 0 or self.experts < 1:
            raise ValueError(f"bad expert grid: layers {self.layers}, {self.experts} experts")
        object.__setattr__(self, "_ordinal", {layer: i for i, layer in enumerate(self.layers)})
        # asked once per decoder layer per forward pass: a lookup, not a scan of the layers
        upcoming: dict[int, int | None] = {}
        following: int | None = None
        for layer in range(self.layers[-1], -1, -1):
            upcoming[layer] = following
            if layer in self._ordinal:
                following = layer
        object.__setattr__(self, "_next", upcoming)

    @property
    def total(self) -> int:
        return len(self.layers) * self.experts

    @property
    def first_layer(self) -> int:
        return self.layers[0]

    def has_layer(self, layer: int) -> bool:
        return layer in self._ordinal

    def ordinal(self, layer: int) -> int:
        """Position of a MoE layer among the MoE layers (0 for the first)."""
        return self._ordinal[layer]

    def next_layer(self, layer: int) -> int | None:
        """The first MoE layer after decoder layer `layer`, None past the last."""
        return self._next.get(layer) if layer >= 0 else self.layers[0]

    def previous_layer(self, layer: int) -> int | None:
        """The last MoE layer before decoder layer `layer`, None before the first."""
        i = bisect.bisect_left(self.layers, layer)
        return self.layers[i - 1] if i else None

    def keys(self) -> Iterator[ExpertKey]:
        """Every expert, layer by layer."""
        for layer in self.layers:
            for e in range(self.experts):
                yield ExpertKey(layer, e)

    def layer_keys(self, layer: int) -> list[ExpertKey]:
        return [ExpertKey(layer, e) for e in range(self.experts)]

    def __contains__(self, key: object) -> bool:
        return (
            isinstance(key, tuple)
            and len(key) == 2
            and key[0] in self._ordinal
            and 0 <= key[1] < self.experts
        )

    def describe(self) -> str:
        if self.layers == tuple(range(self.layers[0], self.layers[-1] + 1)):
            span = f"layers {self.layers[0]}-{self.layers[-1]}"
        else:
            span = f"layers {list(self.layers)}"
        return f"{len(self.layers)} MoE layers ({span}) x {self.experts} experts"
