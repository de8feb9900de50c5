"""`offload-rt serve`: OpenAI-compatible HTTP, native msgpack streaming, metrics."""

from offload_rt.server.app import ServerConfig, build_app

__all__ = ["ServerConfig", "build_app"]
