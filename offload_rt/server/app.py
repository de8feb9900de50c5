"""The HTTP application: FastAPI routes behind the guard, errors in OpenAI's shape.

Why FastAPI and uvicorn rather than Ray Serve: the coordinator is one process that owns the
attention weights, the KV cache and the batch — there is nothing to replicate, and Ray Serve's
replicas and its own router would sit between the client and a batch that must stay whole.
The expert actors already are Ray's; the HTTP front stays a plain ASGI app that runs the same
with the local backend and with no Ray at all.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from offload_rt import protocol
from offload_rt.engine import OffloadModel, RequestError
from offload_rt.engine.scheduler import QueueFull, SchedulerConfig
from offload_rt.server import native, openai_api
from offload_rt.server.chat import ChatTemplate
from offload_rt.server.engine import ServingEngine
from offload_rt.server.guard import Guard, error_body
from offload_rt.server.metrics import Metrics
from offload_rt.server.streams import ClientGone, ServerSideError, Serving

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise: the API has no other guard
    port: int = 8000
    api_key: str | None = None  # when set, every request but /health needs this bearer token
    served_model_name: str | None = None  # the name in /v1/models; None: the folder's name
    max_body_bytes: int = protocol.MAX_REQUEST_BYTES  # larger request bodies get 413
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


def build_app(model: OffloadModel, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app serving `model`; closing the app (its lifespan) stops the scheduler but
    leaves the model to its owner."""
    cfg = config or ServerConfig()
    engine = ServingEngine(model, cfg.scheduler)
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="offload_rt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving = Serving(
        engine=engine,
        model_name=cfg.served_model_name or model.checkpoint.folder.name,
        chat=ChatTemplate.from_folder(model.checkpoint.folder),
        created=int(time.time()),
    )
    app.include_router(openai_api.router)
    app.include_router(native.router)

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "running": engine.scheduler.running()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    _add_error_handlers(app)
    paths = frozenset(
        [
            "/health",
            "/metrics",
            "/v1/models",
            "/v1/completions",
            "/v1/chat/completions",
            protocol.PATH,
        ]
    )

    def count(path: str, status: int) -> None:
        metrics.requests.labels(path, str(status)).inc()

    app.add_middleware(
        Guard,
        api_key=cfg.api_key,
        max_body_bytes=cfg.max_body_bytes,
        count=count,
        known_paths=paths,
    )
    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": error_body(message, status)}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _describe(exc))

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(QueueFull)
    async def busy(request: Request, exc: QueueFull) -> JSONResponse:
        return _error(429, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(ServerSideError)
    async def failed(request: Request, exc: ServerSideError) -> JSONResponse:
        return _error(500, f"the model failed while serving the request: {exc}")

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


def _describe(exc: RequestValidationError) -> str:
    """One line per problem, naming the field: 'body.max_tokens: Input should be ...'."""
    parts = []
    for err in exc.errors()[:8]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)
