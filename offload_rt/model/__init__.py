"""Pure torch math of the Mixtral model: no I/O, no devices chosen here, no parallelism."""

from offload_rt.model.layers import AttentionWeights, KVCache, RopeTables
from offload_rt.model.mixtral import DenseWeights, LayerWeights, MixtralModel
from offload_rt.model.moe import ExpertBackend, ExpertKey, ExpertPrefetcher, expert_ffn, route

__all__ = [
    "AttentionWeights",
    "DenseWeights",
    "ExpertBackend",
    "ExpertKey",
    "ExpertPrefetcher",
    "KVCache",
    "LayerWeights",
    "MixtralModel",
    "RopeTables",
    "expert_ffn",
    "route",
]
