"""offload_rt: run Mixture-of-Experts language models with their experts offloaded.

model = offload_rt.load(path, backend="local", device="cpu", cache_experts=None)
model.generate("Hello", max_new_tokens=16)
remote = offload_rt.connect("http://127.0.0.1:8000")  # a model served by `offload-rt serve`

The names that need torch (load and the model's types) are imported when first used, so that
`offload_rt.connect` and `offload_rt.client` work in a process without torch or Ray.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from offload_rt.client import AsyncRemoteModel, RemoteModel, connect, connect_async
from offload_rt.results import GenerationResult, RequestError

if TYPE_CHECKING:
    from offload_rt.checkpoint import CheckpointError
    from offload_rt.config import ConfigError, ModelConfig
    from offload_rt.engine import OffloadModel, SamplingParams, load
    from offload_rt.model import ExpertKey

__version__ = "0.1.0"

_LAZY = {  # name -> the module that defines it (each imports torch)
    "CheckpointError": "offload_rt.checkpoint",
    "ConfigError": "offload_rt.config",
    "ModelConfig": "offload_rt.config",
    "ExpertKey": "offload_rt.model",
    "OffloadModel": "offload_rt.engine",
    "SamplingParams": "offload_rt.engine",
    "load": "offload_rt.engine",
}

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'offload_rt' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
