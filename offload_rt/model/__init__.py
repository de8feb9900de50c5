"""Pure torch math shared by the families: no I/O, no devices chosen here, no parallelism."""

from offload_rt.grid import ExpertGrid, ExpertKey
from offload_rt.model.decoder import (
    DecoderModel,
    DecoderSpec,
    DenseMLP,
    DenseWeights,
    LayerWeights,
    MoEDecoder,
    MoEWeights,
)
from offload_rt.model.layers import AttentionSpec, AttentionWeights, KVCache, RopeTables
from offload_rt.model.moe import ExpertBackend, ExpertPrefetcher, expert_ffn, route

__all__ = [
    "AttentionSpec",
    "AttentionWeights",
    "DecoderModel",
    "DecoderSpec",
    "DenseMLP",
    "DenseWeights",
    "ExpertBackend",
    "ExpertGrid",
    "ExpertKey",
    "ExpertPrefetcher",
    "KVCache",
    "LayerWeights",
    "MoEDecoder",
    "MoEWeights",
    "RopeTables",
    "expert_ffn",
    "route",
]
