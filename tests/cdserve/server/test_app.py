"""The app's request-body limit (cdserve/server/app.py `BodySizeLimit`), in-process around the
scripted engine: a body over max_body_bytes is a 413 with OpenAI's error body, whether its size is
declared (Content-Length) or only seen as it streams in, and the engine never hears of it."""

from __future__ import annotations

import json

import pytest
from asgi_call import client, running
from fake_engine import FakeEngine

from cdserve.server.app import build_app
from cdserve.server.settings import ServerSettings

pytestmark = pytest.mark.anyio
LIMIT = 1024  # the smallest max_body_bytes the settings allow


@pytest.fixture
def anyio_backend():
    return "asyncio"


def body_of(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes (JSON whitespace pads it)."""
    body = json.dumps({"model": "fake-model", "prompt": "Hi", "max_tokens": 1}).encode()
    return body + b" " * (size - len(body))


async def post(body, headers: dict | None = None):
    engine = FakeEngine()
    app = build_app(ServerSettings(max_body_bytes=LIMIT), engine)
    async with running(app), client(app) as http:
        r = await http.post("/v1/completions", content=body,
                            headers={"content-type": "application/json", **(headers or {})})
    return r, engine


async def test_a_body_of_exactly_the_limit_is_served():
    r, engine = await post(body_of(LIMIT))
    assert r.status_code == 200, r.text
    assert len(engine.requests) == 1


async def test_a_declared_body_one_byte_over_the_limit_is_a_413_before_it_is_read():
    body, read = body_of(LIMIT + 1), []

    async def chunks():
        read.append(len(body))
        yield body

    r, engine = await post(chunks(), {"content-length": str(LIMIT + 1)})
    assert r.status_code == 413
    assert r.json() == {"error": {"message": f"request body is larger than the server's limit of {LIMIT} bytes",
                                  "type": "invalid_request_error", "param": None, "code": None}}
    assert read == [] and engine.requests == []


async def test_a_streamed_body_without_a_length_is_cut_at_the_limit():
    """No Content-Length (chunked): counted as it arrives; the 413 comes once it passes the limit."""
    body = body_of(LIMIT + 1)

    async def chunks():
        for i in range(0, len(body), 100):
            yield body[i:i + 100]

    r, engine = await post(chunks())
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert engine.requests == []
