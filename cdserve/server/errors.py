"""The one place exceptions become HTTP errors: OpenAI's body `{"error": {message, type, param, code}}`.

Routes and the serving layer raise; `error_response` answers plain requests, and a stream that
fails after it started sends `classify(exc).body()` as its error event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cdserve.engine_protocol import QueueFullError
from cdserve.errors import InvalidRequestError
from cdserve.server.protocol import UNSUPPORTED, neutral_values

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                   415: "invalid_request_error", 422: "invalid_request_error",
                   503: "service_unavailable_error"}


class AuthenticationError(Exception):
    """Missing or wrong API key (401)."""


class PayloadTooLargeError(HTTPException):
    """The request body is over the server's max_body_bytes (413)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the server's limit of {limit} bytes")


class ShuttingDownError(RuntimeError):
    """The server is draining (SIGTERM): no new requests; past the grace period, none at all (503)."""


class NotReadyError(RuntimeError):
    """The model and scorer are still loading (or failed to): 503 with Retry-After."""


@dataclass(frozen=True)
class APIError:
    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retry_after: int | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> dict:
        return {"error": {"message": _printable(self.message), "type": self.type,
                          "param": None if self.param is None else _printable(self.param),
                          "code": self.code}}


def _printable(text: str) -> str:
    """`text` as UTF-8 can carry it: a lone surrogate a client sent (in a model name, say) is
    written as its escape instead of failing the error response itself."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# Labels pydantic adds to an error's location that are not parameter names: union branches
# ("str", "list[int]", "constrained-str") and the control union's tags (mode, then selection).
_CONTROL_TAGS = {"none", "token", "block", "best_of_n", "argmax", "sample"}


def _param(loc: tuple) -> str | None:
    parts: list[str] = []
    for part in loc:
        text = str(part)
        if part == "body" or text == "[key]" or (parts == ["control"] and text in _CONTROL_TAGS):
            continue
        if not isinstance(part, int) and ("[" in text or text in _TYPE_LABELS or text.startswith(_LABEL_PREFIXES)):
            continue
        parts.append(text)
    return ".".join(parts) or None


_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict"}
# pydantic error types that say the input is not of a union branch's type at all
_WRONG_TYPE = {"string_type", "list_type", "int_type", "float_type", "bool_type", "dict_type", "model_type",
               "int_parsing", "float_parsing", "bool_parsing", "is_instance_of", "literal_error"}
_LABEL_PREFIXES = ("constrained-", "function-", "literal", "nullable")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    err = errors[0]
    param = _param(tuple(err.get("loc", ())))
    kind = err.get("type")
    if kind == "json_invalid":
        return APIError(400, "request body is not valid JSON", "invalid_request_error", None, "invalid_json")
    if param is None and isinstance(err.get("input"), (bytes, str)):
        return APIError(400, "the request body must be a JSON object, sent with 'Content-Type: "
                        "application/json'", "invalid_request_error", None, "invalid_json")
    top = param.split(".")[0] if param else None
    if top in UNSUPPORTED:
        return APIError(400, f"{top}: not supported by this server (accepted only: "
                        f"{neutral_values(top)})", "invalid_request_error", top, "unsupported_parameter")
    too_long = [e for e in errors if e.get("type") == "too_long" and _param(tuple(e["loc"])).startswith("prompt")]
    if top == "prompt" and too_long:  # token ids past the context
        ctx = too_long[0].get("ctx", {})
        return APIError(400, f"prompt: this model's maximum context length is {ctx.get('max_length', 0) + 1} "
                        f"tokens; the prompt has {ctx.get('actual_length')} tokens", "invalid_request_error",
                        "prompt", "context_length_exceeded")
    if kind == "extra_forbidden":
        if top == "control" and param.count(".") == 1:
            return APIError(400, f"{param}: does not apply to this mode (or is not a control field); "
                            "see GET /v1/scorers", "invalid_request_error", param, "unknown_parameter")
        return APIError(400, f"unknown parameter '{param}'", "invalid_request_error", param,
                        "unknown_parameter")
    if kind == "union_tag_invalid":  # control.mode or control.selection
        tag = "selection" if "'argmax'" in err.get("msg", "") else "mode"
        param = f"{param}.{tag}"
        return APIError(400, f"{param}: {err.get('ctx', {}).get('tag', 'this value')!s} is not one of "
                        f"{err.get('ctx', {}).get('expected_tags', '')}", "invalid_request_error", param)
    # a union (prompt, stop, ...): the branch that got furthest says most; at equal depth, one whose
    # type the input had (5 stop strings: "at most 4 items", not the str branch's "a valid string")
    same = [e for e in errors if _param(tuple(e.get("loc", ())))
            and _param(tuple(e.get("loc", ()))).split(".")[0] == top] or [err]
    deepest = max(same, key=lambda e: (len(e.get("loc", ())), e.get("type") not in _WRONG_TYPE))
    msg = deepest.get("msg", "invalid value")
    return APIError(400, f"{param}: {msg}" if param else msg, "invalid_request_error", param)


def classify(exc: BaseException, retry_after: int = 1) -> APIError:
    """Map any exception to an APIError. Anything not foreseen is a 500 that reveals nothing."""
    if isinstance(exc, InvalidRequestError):
        message = exc.message if exc.param in (None, "model") else f"{exc.param}: {exc.message}"
        return APIError(exc.status_code, message, _TYPE_BY_STATUS.get(exc.status_code,
                        "invalid_request_error"), exc.param, exc.code)
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, QueueFullError):
        return APIError(503, "the server is at capacity (request queue full); retry later",
                        "service_unavailable_error", None, "queue_full", retry_after)
    if isinstance(exc, NotReadyError):
        return APIError(503, str(exc), "service_unavailable_error", None, "not_ready", retry_after)
    if isinstance(exc, ShuttingDownError):
        return APIError(503, str(exc), "service_unavailable_error", None, "shutting_down", retry_after)
    if isinstance(exc, AuthenticationError):
        return APIError(401, str(exc), "authentication_error", None, "invalid_api_key")
    if isinstance(exc, HTTPException):
        return APIError(exc.status_code, str(exc.detail), _TYPE_BY_STATUS.get(exc.status_code, "api_error"),
                        headers=tuple((exc.headers or {}).items()))  # 405's Allow
    log.exception("internal error", exc_info=exc)
    return APIError(500, "internal server error", "internal_error")


def error_response(exc: BaseException, retry_after: int = 1) -> JSONResponse:
    """The HTTP answer to `exc`. It cannot fail itself: anything going wrong here is a bare 500."""
    try:
        err = classify(exc, retry_after)
        headers = dict(err.headers)
        if err.retry_after is not None:
            headers["Retry-After"] = str(err.retry_after)
        if err.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(err.body(), status_code=err.status, headers=headers or None)
    except Exception:
        log.exception("the error handler failed on %s", type(exc).__name__)
        return JSONResponse(_INTERNAL, status_code=500)


_INTERNAL = {"error": {"message": "internal server error", "type": "internal_error", "param": None,
                       "code": None}}


def install_error_handlers(app: FastAPI, retry_after: int = 1,
                           on_error=None) -> None:
    """Every exception a request can raise goes through `error_response`. `on_error(request,
    status)` lets the metrics count refused requests."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        response = error_response(exc, retry_after)
        if on_error is not None:
            on_error(request, response.status_code)
        return response

    for exc_type in (RequestValidationError, HTTPException, InvalidRequestError, QueueFullError,
                     AuthenticationError, NotReadyError, ShuttingDownError, Exception):
        app.add_exception_handler(exc_type, handle)
