"""API key on and off: /v1/* needs `Authorization: Bearer <key>` when one is configured; the
probes and /metrics stay open."""

from __future__ import annotations

import httpx
import openai
import pytest

KEY = "test-key-123"


@pytest.fixture(scope="module")
def keyed(launch):
    return launch("--max-model-len", "1024", "--max-tokens-limit", "100", api_key=KEY)


def test_api_key_required(keyed):
    body = {"model": keyed.model, "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{keyed.url}/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401, headers
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/v1/scorers"):
        assert httpx.get(f"{keyed.url}{path}").status_code == 401
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{keyed.url}{path}").status_code == 200


def test_api_key_through_the_client(keyed):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0).models.list()
    client = keyed.client()
    assert client.models.list().data[0].id == keyed.model
    r = client.chat.completions.create(model=keyed.model, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3)
    assert r.usage.completion_tokens <= 3


def test_no_api_key_configured_means_open(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": "Hi", "max_tokens": 1},
                   headers={"Authorization": "Bearer anything"}, timeout=60)
    assert r.status_code == 200
    assert httpx.get(f"{server.url}/v1/models").status_code == 200
