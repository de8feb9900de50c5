"""offload_rt: run Mixture-of-Experts language models with their experts offloaded.

model = offload_rt.load(path, backend="local", device="cpu", cache_experts=None)
model.generate("Hello", max_new_tokens=16)
"""

from offload_rt.checkpoint import CheckpointError
from offload_rt.config import ConfigError, ModelConfig
from offload_rt.engine import GenerationResult, OffloadModel, RequestError, SamplingParams, load
from offload_rt.model import ExpertKey

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ExpertKey",
    "GenerationResult",
    "ModelConfig",
    "OffloadModel",
    "RequestError",
    "SamplingParams",
    "load",
]
