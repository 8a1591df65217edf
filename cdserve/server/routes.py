"""HTTP routes. Each one is a line or two: the serving layer does the work, errors.py answers
failures. /v1/* needs the API key when one is configured; /health, /ready and /metrics stay open
(probes and scrapers), as in vLLM."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cdserve.server import protocol as p
from cdserve.server.errors import AuthenticationError, NotReadyError, ShuttingDownError
from cdserve.server.metrics import CONTENT_TYPE_LATEST
from cdserve.server.state import ServerState

_ERRORS = {status: {"model": p.ErrorResponse, "description": what} for status, what in (
    (400, ("Invalid parameter (`error.param` names it), prompt too long for the context, a request "
           "the engine cannot schedule (n x num_candidates over max_batch_rows).")),
    (401, "Missing or wrong API key (only when the server has one)."),
    (404, "Unknown model."),
    (413, "Request body too large."),
    (503, "Queue full or still loading (see Retry-After), or shutting down."))}


def get_state(request: Request) -> ServerState:
    return request.app.state.cdserve


State = Annotated[ServerState, Depends(get_state)]
_bearer = HTTPBearer(auto_error=False, description="The server's API key, if it has one.")


def require_api_key(state: State,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    key = state.settings.api_key
    if key is None:
        return
    if credentials is None:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(credentials.credentials.encode(), key.get_secret_value().encode()):
        raise AuthenticationError("incorrect API key")


def require_ready(state: State) -> None:
    if state.status == "draining":
        raise ShuttingDownError("the server is shutting down; retry on another replica")
    if state.status != "ready":
        raise NotReadyError(f"not ready: the server is {state.status}")


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key), Depends(require_ready)],
               responses={s: _ERRORS[s] for s in (401, 503)})
_GENERATION_ERRORS = {s: _ERRORS[s] for s in (400, 404, 413)}
probes = APIRouter()


# The body is read here, not declared: its model depends on the loaded engine (model name,
# vocabulary, heads), so cdserve/server/openapi.py documents it from the same models.
@v1.post("/completions", response_model=p.CompletionResponse, tags=["OpenAI"],
         responses=_GENERATION_ERRORS)
async def create_completion(request: Request, state: State) -> Response:
    """Create a completion (the `control` field steers it)."""
    body = p.parse_request(state.models.completion, await request.body(), state.engine.model_name,
                           request.headers.get("content-type"))
    return await state.serving.complete(body, request, "/v1/completions")


@v1.post("/chat/completions", response_model=p.ChatCompletionResponse, tags=["OpenAI"],
         responses=_GENERATION_ERRORS)
async def create_chat_completion(request: Request, state: State) -> Response:
    """Create a chat completion (the `control` field steers it)."""
    body = p.parse_request(state.models.chat, await request.body(), state.engine.model_name,
                           request.headers.get("content-type"))
    return await state.serving.complete(body, request, "/v1/chat/completions")


@v1.get("/models", response_model=p.ModelList, tags=["OpenAI"])
async def list_models(state: State) -> p.ModelList:
    engine = state.engine
    return p.ModelList(data=[p.ModelCard(id=engine.model_name, created=state.started_at,
                                         max_model_len=engine.max_model_len,
                                         backend=engine.backend_name, scorer=state.scorer_id)])


@v1.get("/scorers", response_model=p.ScorerList, tags=["cdserve"])
async def list_scorers(state: State) -> p.ScorerList:
    return p.ScorerList(data=[state.scorer_info()])


@v1.get("/rewards", response_model=p.RewardList, tags=["cdserve"])
async def list_rewards(state: State) -> p.RewardList:
    """The rewards `control.rewards` may name (Python rewards and HTTP reward models)."""
    return p.RewardList(data=[p.RewardInfo(**r) for r in state.rewards.describe()])


@probes.get("/health", tags=["probes"])
async def health() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@probes.get("/ready", tags=["probes"], responses={503: {"model": p.ErrorResponse}})
async def ready(state: State) -> Response:
    """Readiness: model and scorer loaded, not shutting down."""
    if state.status != "ready":
        raise NotReadyError(f"not ready: the server is {state.status}")
    return JSONResponse({"status": "ready", "model": state.engine.model_name,
                         "scorer": state.scorer_id, "backend": state.engine.backend_name})


@probes.get("/metrics", tags=["probes"], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(state: State) -> Response:
    """Prometheus metrics."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
