"""The seam every model family plugs into: its config, its checkpoint spec, its decoder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from offload_rt.checkpoint import CheckpointSpec
from offload_rt.config import ConfigReader, ModelConfig
from offload_rt.model import DecoderModel, ExpertBackend, ExpertPrefetcher
from offload_rt.models.common import (
    MoENames,
    SoftmaxMoEConfig,
    build_decoder,
    checkpoint_spec,
)


class Family(Protocol):
    model_type: str  # config.json's model_type
    architectures: tuple[str, ...]  # config.json's architectures naming it

    def parse(self, r: ConfigReader) -> ModelConfig:
        """config.json -> the family's config; errors name the field."""
        ...

    def spec(self, cfg: Any, present: frozenset) -> CheckpointSpec:
        """What a checkpoint of `cfg` holds, given the tensor names present (for layouts)."""
        ...

    def build(
        self,
        cfg: Any,
        get: Callable[[str], torch.Tensor],
        present: frozenset,
        backend: ExpertBackend,
        device: torch.device,
        prefetcher: ExpertPrefetcher | None,
    ) -> DecoderModel:
        """The decoder from its dense weights (`get` reads one onto the device) and the
        backend that runs its routed experts."""
        ...

    def demo_config(self, vocab_size: int) -> dict[str, Any]:
        """config.json of a small random checkpoint (`offload-rt demo --family`)."""
        ...


@dataclass(frozen=True)
class SoftmaxFamily:
    """A family of the shared softmax-routed decoder: its parser, names and demo shape."""

    model_type: str
    architectures: tuple[str, ...]
    parser: Callable[[ConfigReader], SoftmaxMoEConfig]
    names: MoENames
    demo: Callable[[int], dict[str, Any]]

    def parse(self, r: ConfigReader) -> SoftmaxMoEConfig:
        return self.parser(r)

    def spec(self, cfg: SoftmaxMoEConfig, present: frozenset) -> CheckpointSpec:
        return checkpoint_spec(cfg, self.names, present)

    def build(
        self,
        cfg: SoftmaxMoEConfig,
        get: Callable[[str], torch.Tensor],
        present: frozenset,
        backend: ExpertBackend,
        device: torch.device,
        prefetcher: ExpertPrefetcher | None,
    ) -> DecoderModel:
        return build_decoder(cfg, self.names, get, present, backend, device, prefetcher)

    def demo_config(self, vocab_size: int) -> dict[str, Any]:
        return self.demo(vocab_size)
