"""Input no tokenizer or encoder takes, and loose types: always an OpenAI error (400), never a 5xx.
(Shutdown in every mode, a request cut at the drain deadline before its first output included, is
tested in-process in test_serving.py.)"""

from __future__ import annotations

import json

import httpx
import pytest

from cdserve.errors import InvalidRequestError
from cdserve.server.errors import error_response

S = "\ud800"  # a lone UTF-16 surrogate: valid JSON ("\ud800"), not valid Unicode text


@pytest.fixture(scope="module")
def http(server):
    with server.http() as c:
        yield c


def post(http, path: str, body: dict) -> httpx.Response:
    # json.dumps writes the surrogate as the escape \ud800, as JavaScript's JSON.stringify does
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def completion(server, **fields) -> dict:
    return {"model": server.model, "prompt": "Hi", "max_tokens": 2, **fields}


def chat(server, **fields) -> dict:
    return {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


SURROGATES = [  # (path, fields, param)
    ("/v1/completions", {"prompt": S}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "a" + S]}, "prompt.1"),
    ("/v1/completions", {"model": "m" + S}, "model"),
    ("/v1/completions", {"stop": [S]}, "stop.0"),
    ("/v1/completions", {"user": S}, "user"),
    ("/v1/completions", {"control": {"weights": {S: 1.0}}}, "control.weights"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": S}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": S}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": S}]}, "messages.0.name"),
    ("/v1/chat/completions", {"model": S}, "model"),
    ("/v1/chat/completions", {"control": {"mode": "token", "weights": {"positive" + S: 1.0}}},
     "control.weights"),
    ("/v1/chat/completions", {S: 1}, None),  # an unknown key, itself not valid text
]


@pytest.mark.parametrize("path, fields, param", SURROGATES)
def test_lone_surrogates_are_a_400_naming_where(server, http, path, fields, param):
    build = completion if path == "/v1/completions" else chat
    r = post(http, path, build(server, **fields))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_unicode" and err["param"] == (param or "body"), err
    r.content.decode("utf-8")  # the answer itself is valid UTF-8


LOOSE = [  # OpenAI's schema is strict: none of these is an integer / a boolean / a number
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": "2"}, "max_tokens"),
    ({"n": 1.5}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"temperature": "1"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"seed": "7"}, "seed"),
    ({"prompt": [True, 2]}, "prompt"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"control": {"mode": "token", "top_k": True}}, "control.top_k"),
    ({"control": {"mode": "token", "strength": "2"}}, "control.strength"),
]


@pytest.mark.parametrize("fields, param", LOOSE)
def test_loose_types_are_refused(server, http, fields, param):
    r = post(http, "/v1/completions", completion(server, **fields))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_integral_numbers_are_integers(server, http):
    """JSON has one number type: 2.0 is the integer 2 (JSON Schema agrees), 2 is the float 2.0."""
    r = post(http, "/v1/completions", completion(server, max_tokens=2.0, n=1.0, temperature=1,
                                                 prompt=[42.0, 43]))
    assert r.status_code == 200, r.text


def test_405_names_the_allowed_methods(http):
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_error_response_carries_surrogates_as_escapes():
    r = error_response(InvalidRequestError("model", f"the model 'x{S}' does not exist", 404, "model_not_found"))
    assert r.status_code == 404
    assert "\\ud800" in json.loads(r.body)["error"]["message"]


def test_error_handler_cannot_fail():
    class Weird(Exception):
        def __str__(self):
            raise RuntimeError("no string for you")

    class Exploding(InvalidRequestError):
        @property
        def param(self):
            raise RuntimeError("boom")

        @param.setter
        def param(self, value):
            pass

    for exc in (Weird(), Exploding("x", "y")):
        r = error_response(exc)
        assert r.status_code == 500
        assert json.loads(r.body)["error"]["type"] == "internal_error"

