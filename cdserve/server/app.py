"""The FastAPI application: lifespan (engine start and stop), middleware, error handlers, routes."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cdserve.engine_protocol import Engine
from cdserve.server import routes
from cdserve.server.errors import PayloadTooLargeError, install_error_handlers
from cdserve.server.metrics import ServerMetrics
from cdserve.server.openapi import install_openapi
from cdserve.server.playground import install_playground
from cdserve.server.serving import OpenAIServing
from cdserve.server.settings import ServerSettings
from cdserve.server.state import ServerState

log = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` (413) without reading them into memory: by the
    declared Content-Length, or while the body streams in. The error is raised from `receive`, so
    it reaches the app's error handlers like any other."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise PayloadTooLargeError(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLargeError(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def _version() -> str:
    try:
        return importlib.metadata.version("cdserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def build_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    """The app for these settings; the engine is built from them unless one is given."""
    if engine is None:
        from cdserve.engine_factory import build_engine

        engine = build_engine(settings.engine_config())
    metrics = ServerMetrics()
    state = ServerState(settings, engine, metrics, OpenAIServing(engine, settings, metrics))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background: /health answers at once, /ready and /v1 say 503 until loaded.
        state.loop = asyncio.get_running_loop()
        loading = asyncio.create_task(state.load())
        yield
        await state.stop(loading)

    app = FastAPI(title="cdserve", version=_version(), lifespan=lifespan,
                  strict_content_type=False,
                  description="OpenAI-compatible server for controlled decoding: a frozen base "
                  "model steered at decode time by a multi-head prefix scorer. The `control` "
                  "field of completions and chat completions is cdserve's extension.")
    app.state.cdserve = state

    def count_refused(request: Request, status: int) -> None:
        if request.url.path in GENERATION_PATHS:
            mode = getattr(request.state, "mode", "unknown")
            metrics.requests.labels(request.url.path, mode, str(status)).inc()

    install_error_handlers(app, settings.retry_after_seconds, on_error=count_refused)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.include_router(routes.v1)
    app.include_router(routes.probes)
    install_playground(app)
    install_openapi(app)
    return app
