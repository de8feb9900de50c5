"""Pure torch math shared by the families: no I/O, no devices chosen here, no parallelism."""

from offload_rt.grid import ExpertGrid, ExpertKey
from offload_rt.model.decoder import MoEDecoder
from offload_rt.model.ffn import ClampedSwiGLU, ExpertFFN, SwiGLU
from offload_rt.model.interface import (
    DecoderModel,
    DecoderSpec,
    DenseMLP,
    DenseWeights,
    LayerWeights,
    MoEWeights,
)
from offload_rt.model.kvcache import KVCache
from offload_rt.model.layers import AttentionSpec, AttentionWeights, RopeTables
from offload_rt.model.moe import ExpertBackend, ExpertPrefetcher, RouterSpec, route

__all__ = [
    "AttentionSpec",
    "AttentionWeights",
    "ClampedSwiGLU",
    "DecoderModel",
    "DecoderSpec",
    "DenseMLP",
    "DenseWeights",
    "ExpertBackend",
    "ExpertFFN",
    "ExpertGrid",
    "ExpertKey",
    "ExpertPrefetcher",
    "KVCache",
    "LayerWeights",
    "MoEDecoder",
    "MoEWeights",
    "RopeTables",
    "RouterSpec",
    "SwiGLU",
    "route",
]
