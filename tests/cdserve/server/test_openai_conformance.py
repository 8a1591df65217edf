"""Real responses of a live server, validated against OpenAI's published schemas (the component
schemas of openai/openai-openapi, extracted verbatim into openai_spec/openai-schemas.json) with a
JSON-Schema validator: every control mode, streamed and not, n > 1, several prompts,
stream_options.include_usage, stop strings, /v1/models and the error bodies.

OpenAPI's `nullable: true` is read as "or null". One reading is ours, not the document's: the
spec says a streamed /v1/completions chunk has CreateCompletionResponse's shape, whose
`finish_reason` is a non-null string, yet every chunk before the last has no finish reason yet
(OpenAI's own API sends null there, as the chat chunks' schema allows). Those chunks are validated
against CreateCompletionResponse with only that field made nullable; the last chunk of each
choice, which carries the finish reason, against the unmodified schema.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import httpx
import jsonschema
import pytest

SPEC = json.loads((Path(__file__).parent / "openai_spec" / "openai-schemas.json").read_text())


def _nullable_to_anyof(node):
    """OpenAPI 3.0's `nullable: true` as JSON Schema: the schema, or null."""
    if isinstance(node, list):
        return [_nullable_to_anyof(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_to_anyof(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


SCHEMAS = _nullable_to_anyof(SPEC["components"]["schemas"])
# the one relaxation (see the module docstring): a completion chunk before its finish reason
_chunk = copy.deepcopy(SCHEMAS["CreateCompletionResponse"])
_reason = _chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
_chunk["properties"]["choices"]["items"]["properties"]["finish_reason"] = {"anyOf": [_reason, {"type": "null"}]}
SCHEMAS["CompletionChunkBeforeFinish"] = _chunk
ROOT = {"components": {"schemas": SCHEMAS}}


def validate(instance: dict, schema_name: str) -> None:
    schema = {**ROOT, "$ref": f"#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema).validate(instance)


PROMPT = "Hello there"
MODES = {
    "none": {"mode": "none"},
    "token": {"mode": "token", "weights": {"positive": 1.0}, "strength": 3.0, "top_k": 10},
    "block": {"mode": "block", "weights": {"specific": 1.0}, "block_size": 2, "num_candidates": 2},
    "block-sample": {"mode": "block", "block_size": 2, "num_candidates": 2, "selection": "sample",
                     "strength": 2.0},
    "best_of_n": {"mode": "best_of_n", "weights": {"concise": 1.0}, "num_candidates": 2},
}
VARIANTS = {  # extra request fields
    "plain": {},
    "n2": {"n": 2},
    "stop": {"stop": ["e", " the"]},
    "usage": {"stream_options": {"include_usage": True}},
}


@pytest.fixture(scope="module")
def http(server):
    with server.http() as c:
        yield c


def sse_events(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]


def check_stream(events: list[str], chat: bool, include_usage: bool) -> list[dict]:
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert "error" not in chunk, chunk
        if chat:
            validate(chunk, "CreateChatCompletionStreamResponse")
        elif all(c["finish_reason"] is not None for c in chunk["choices"]):
            validate(chunk, "CreateCompletionResponse")
        else:
            validate(chunk, "CompletionChunkBeforeFinish")
        assert "system_fingerprint" not in chunk or isinstance(chunk["system_fingerprint"], str)
    usage = [c for c in chunks if c.get("usage") is not None]
    if include_usage:
        assert len(usage) == 1 and usage[0] is chunks[-1] and chunks[-1]["choices"] == []
    else:
        assert not usage
    return chunks


def body(server, chat: bool, control: dict, **extra) -> dict:
    base = {"model": server.model, "max_tokens": 6, "seed": 1, "control": control, **extra}
    if chat:
        return {**base, "messages": [{"role": "user", "content": PROMPT}]}
    return {**base, "prompt": PROMPT}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_generation_validates(server, http, chat, stream, mode, variant):
    extra = dict(VARIANTS[variant])
    if "stream_options" in extra and not stream:
        extra.pop("stream_options")
    path = "/v1/chat/completions" if chat else "/v1/completions"
    req = body(server, chat, MODES[mode], stream=stream, **extra)
    r = http.post(path, json=req)
    if stream:
        chunks = check_stream(sse_events(r), chat, "stream_options" in extra)
        finished = {c["index"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]}
        assert finished == set(range(extra.get("n", 1)))
        return
    assert r.status_code == 200, r.text
    out = r.json()
    validate(out, "CreateChatCompletionResponse" if chat else "CreateCompletionResponse")
    assert len(out["choices"]) == extra.get("n", 1)
    for choice in out["choices"]:
        assert choice["control"]["mode"] == MODES[mode]["mode"]  # the extension rides along
        if chat:
            assert choice["message"]["refusal"] is None


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_several_prompts_validate(server, http, stream):
    req = {"model": server.model, "prompt": ["One", "Two"], "n": 2, "max_tokens": 4, "stream": stream}
    r = http.post("/v1/completions", json=req)
    if stream:
        check_stream(sse_events(r), chat=False, include_usage=False)
    else:
        assert r.status_code == 200, r.text
        validate(r.json(), "CreateCompletionResponse")
        assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]


def test_models_validate(http):
    r = http.get("/v1/models")
    assert r.status_code == 200
    validate(r.json(), "ListModelsResponse")


ERRORS = {
    "bad-temperature": ("/v1/completions", {"prompt": PROMPT, "temperature": 9}, 400),
    "loose-type": ("/v1/completions", {"prompt": PROMPT, "max_tokens": True}, 400),
    "bad-control": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                             "control": {"mode": "block", "top_k": 3}}, 400),
    "surrogate": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, 400),
    "surrogate-model": ("/v1/completions", {"prompt": PROMPT, "model": "gpt-\ud800"}, 400),
    "unknown-model": ("/v1/completions", {"prompt": PROMPT, "model": "gpt-4"}, 404),
    "unsupported": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                             "tools": [{"type": "function"}]}, 400),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_validate(server, http, case):
    path, fields, status = ERRORS[case]
    # json.dumps escapes the lone surrogates (\\ud800) as a client's JSON encoder would
    r = http.post(path, content=json.dumps({"model": server.model, "max_tokens": 2, **fields}),
                  headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    validate(r.json(), "ErrorResponse")


def test_other_errors_validate(http):
    for r, status in ((http.get("/v1/completions"), 405), (http.get("/v1/nothing"), 404),
                      (http.post("/v1/completions", json={"prompt": "x" * 70000}), 413)):
        assert r.status_code == status, r.text
        validate(r.json(), "ErrorResponse")


def test_stream_error_event_validates():
    """An error event of a stream is an ErrorResponse (the live case is test_load's SIGTERM test)."""
    from cdserve.server.errors import ShuttingDownError, classify

    validate(classify(ShuttingDownError("shutting down")).body(), "ErrorResponse")


def test_schemas_are_openais():
    """The extracted schemas are the copied spec's, verbatim (when the spec is at hand)."""
    spec_path = Path(__file__).parents[4] / "shared" / "specs" / "openai-openapi.yaml"
    if not spec_path.exists():
        pytest.skip(f"{spec_path} is not here")
    import yaml

    spec = yaml.load(spec_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for name, schema in SPEC["components"]["schemas"].items():
        assert spec["components"]["schemas"][name] == schema, name
