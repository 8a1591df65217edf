"""API key on and off: /v1/* needs `Authorization: Bearer <key>` when one is configured; the
probes and /metrics stay open. In-process around the scripted engine (tests/cdserve/server/
fake_engine.py): the key is checked before any route or engine work, so no model is needed."""

from __future__ import annotations

import openai
import pytest
from asgi_call import client, running
from fake_engine import FakeEngine

from cdserve.server.app import build_app
from cdserve.server.settings import ServerSettings

pytestmark = pytest.mark.anyio
KEY = "test-key-123"
BODY = {"model": "fake-model", "prompt": "Hi", "max_tokens": 2}


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_api_key_required():
    engine = FakeEngine()
    app = build_app(ServerSettings(api_key=KEY), engine)
    async with running(app), client(app) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = await http.post("/v1/completions", json=BODY, headers=headers)
            assert r.status_code == 401, headers
            err = r.json()["error"]
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        for path in ("/v1/models", "/v1/scorers", "/v1/rewards"):
            assert (await http.get(path)).status_code == 401, path
        for path in ("/health", "/ready", "/metrics"):
            assert (await http.get(path)).status_code == 200, path
        assert (await http.post("/v1/completions", json=BODY,
                                headers={"Authorization": f"Bearer {KEY}"})).status_code == 200
    assert len(engine.requests) == 1  # only the request with the key reached the engine


async def test_api_key_through_the_client():
    app = build_app(ServerSettings(api_key=KEY), FakeEngine())
    async with running(app), client(app) as http:
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=f"{http.base_url}/v1", api_key="wrong", max_retries=0,
                                     http_client=http).models.list()
        keyed = openai.AsyncOpenAI(base_url=f"{http.base_url}/v1", api_key=KEY, max_retries=0, http_client=http)
        assert (await keyed.models.list()).data[0].id == "fake-model"
        r = await keyed.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=3)
        assert r.choices[0].message.content == "Hello world"


async def test_no_api_key_configured_means_open():
    app = build_app(ServerSettings(), FakeEngine())
    async with running(app), client(app) as http:
        r = await http.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer anything"})
        assert r.status_code == 200
        assert (await http.get("/v1/models")).status_code == 200
