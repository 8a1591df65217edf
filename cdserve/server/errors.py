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

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic's union branches add type tags to the path ("str", "list[str]"): drop them
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int")]
    return ".".join(parts) or None


def classify(exc: BaseException, retry_after: int = 1) -> APIError:
    """Map any exception to an APIError. Anything not foreseen is a 500 that reveals nothing."""
    if isinstance(exc, InvalidRequestError):
        message = exc.message if exc.param in (None, "model") else f"{exc.param}: {exc.message}"
        return APIError(exc.status_code, message, _TYPE_BY_STATUS.get(exc.status_code,
                        "invalid_request_error"), exc.param, exc.code)
    if isinstance(exc, RequestValidationError):
        err = exc.errors()[0]
        param = _param(tuple(err.get("loc", ())))
        if err.get("type") == "json_invalid":
            return APIError(400, "request body is not valid JSON", "invalid_request_error", None, "invalid_json")
        if err.get("type") == "extra_forbidden":
            return APIError(400, f"unknown parameter '{param}'", "invalid_request_error", param,
                            "unknown_parameter")
        if param is None and isinstance(err.get("input"), (bytes, str)):
            return APIError(400, "the request body must be a JSON object, sent with 'Content-Type: "
                            "application/json'", "invalid_request_error", None, "invalid_json")
        msg = err.get("msg", "invalid value")
        return APIError(400, f"{param}: {msg}" if param else msg, "invalid_request_error", param)
    if isinstance(exc, QueueFullError):
        return APIError(503, "the server is at capacity (request queue full); retry later",
                        "service_unavailable_error", None, "queue_full", retry_after)
    if isinstance(exc, NotReadyError):
        return APIError(503, str(exc), "service_unavailable_error", None, "not_ready", retry_after)
    if isinstance(exc, ShuttingDownError):
        return APIError(503, str(exc), "service_unavailable_error", None, "shutting_down")
    if isinstance(exc, AuthenticationError):
        return APIError(401, str(exc), "authentication_error", None, "invalid_api_key")
    if isinstance(exc, HTTPException):
        return APIError(exc.status_code, str(exc.detail), _TYPE_BY_STATUS.get(exc.status_code, "api_error"))
    log.exception("internal error", exc_info=exc)
    return APIError(500, "internal server error", "internal_error")


def error_response(exc: BaseException, retry_after: int = 1) -> JSONResponse:
    err = classify(exc, retry_after)
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    if err.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


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
