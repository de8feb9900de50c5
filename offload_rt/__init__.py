"""offload_rt: run Mixture-of-Experts language models with their experts offloaded.

model = offload_rt.load(path, backend="local", device="cpu", cache_experts=None)
model.generate("Hello", max_new_tokens=16)
remote = offload_rt.connect("http://127.0.0.1:8000")  # a model served by `offload-rt serve`
"""

from offload_rt.checkpoint import CheckpointError
from offload_rt.client import AsyncRemoteModel, RemoteModel, connect, connect_async
from offload_rt.config import ConfigError, ModelConfig
from offload_rt.engine import GenerationResult, OffloadModel, RequestError, SamplingParams, load
from offload_rt.model import ExpertKey

__version__ = "0.1.0"

__all__ = [
    "AsyncRemoteModel",
    "RemoteModel",
    "connect",
    "connect_async",
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
