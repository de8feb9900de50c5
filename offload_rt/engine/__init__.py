"""The coordinator: loading, the forward pass over a batch, generation and sampling."""

from offload_rt.engine.generate import BatchDecoder, GenerationResult
from offload_rt.engine.runtime import OffloadModel, load
from offload_rt.engine.sampling import RequestError, SamplingParams

__all__ = [
    "BatchDecoder",
    "GenerationResult",
    "OffloadModel",
    "RequestError",
    "SamplingParams",
    "load",
]
