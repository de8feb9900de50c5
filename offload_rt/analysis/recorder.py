"""Recording which experts each forward pass used in each layer, as a `RoutingTrace`.

`RoutingRecorder` wraps any expert backend: it passes every call through unchanged and notes
the layer's expert ids, so traces from real runs feed the cache-policy simulator.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from offload_rt.analysis.traces import RoutingTrace
from offload_rt.model.moe import ExpertBackend, ExpertKey


class RoutingRecorder:
    def __init__(self, inner: ExpertBackend, num_layers: int, num_experts: int) -> None:
        self.inner = inner
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.calls: list[tuple[int, ...]] = []  # one per layer call, in order

    def run(self, groups: Mapping[ExpertKey, torch.Tensor]) -> dict[ExpertKey, torch.Tensor]:
        self.calls.append(tuple(sorted(k.expert for k in groups)))
        return self.inner.run(groups)

    def trace(self, prompt_passes: frozenset[int] = frozenset({0})) -> RoutingTrace:
        """Every complete forward pass recorded so far. prompt_passes: the prefills (of one
        `generate` call: the first pass), which the simulator lets fill the cache uncounted."""
        whole = len(self.calls) // self.num_layers * self.num_layers
        passes = tuple(
            tuple(self.calls[i : i + self.num_layers]) for i in range(0, whole, self.num_layers)
        )
        prompts = frozenset(p for p in prompt_passes if p < len(passes))
        return RoutingTrace(self.num_layers, self.num_experts, passes, prompts)
