"""Every error class: status, OpenAI's error body, and `param`. And no client input gives a 500."""

from __future__ import annotations

import httpx
import openai
import pytest

PROMPT = "Hello there"


def assert_error(r: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["param"] == param and err["message"] and err["type"]
    if code is not None:
        assert err["code"] == code
    return err


@pytest.fixture(scope="module")
def http(server):
    with server.http() as c:
        yield c


def completion(server, **fields):
    return {"model": server.model, "prompt": PROMPT, "max_tokens": 2, **fields}


def chat(server, **fields):
    limit = {} if "max_completion_tokens" in fields else {"max_tokens": 2}
    return {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], **limit, **fields}


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 5}, "n"),
    ({"n": 0}, "n"),
    ({"max_tokens": 1001}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"seed": 2**64}, "seed"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
])
def test_bad_sampling_parameters(server, http, fields, param):
    assert_error(http.post("/v1/completions", json=completion(server, **fields)), 400, param)


@pytest.mark.parametrize("control, param", [
    ({"weights": {"nope": 1.0}}, "control.weights.nope"),
    ({"mode": "sideways"}, "control.mode"),
    ({"mode": "token", "strength": -1}, "control.strength"),
    ({"mode": "token", "strength": 1e9}, "control.strength"),
    ({"mode": "token", "top_k": 100000}, "control.top_k"),
    ({"mode": "block", "top_k": 5}, "control.top_k"),  # field that makes no sense for the mode
    ({"mode": "none", "strength": 2.0}, "control.strength"),
    ({"mode": "block", "num_candidates": 9}, "control.num_candidates"),
    ({"mode": "block", "block_size": 0}, "control.block_size"),
    ({"mode": "best_of_n", "selection": "vote"}, "control.selection"),
    ({"mode": "token", "temperature": 1}, "control.temperature"),
    ({"weights": {"positive": 1e6}}, "control.weights.positive"),
])
def test_bad_control(server, http, control, param):
    assert_error(http.post("/v1/completions", json=completion(server, control=control)), 400, param)
    assert_error(http.post("/v1/chat/completions", json=chat(server, control=control)), 400, param)


def test_bad_control_type(server, http):
    assert_error(http.post("/v1/completions", json=completion(server, control="token")), 400, "control")


def test_non_finite_numbers(server, http):
    # Python's json (and some clients) write NaN/Infinity; they must be refused by name, not crash
    body = f'{{"model": "{server.model}", "prompt": "hi", "control": {{"mode": "token", "strength": NaN}}}}'
    assert_error(http.post("/v1/completions", content=body, headers={"content-type": "application/json"}),
                 400, "control.strength")
    body = f'{{"model": "{server.model}", "prompt": "hi", "temperature": Infinity}}'
    assert_error(http.post("/v1/completions", content=body, headers={"content-type": "application/json"}),
                 400, "temperature")


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"max_tokens": 2, "max_completion_tokens": 2}, "max_tokens"),  # both: ambiguous
    ({"max_completion_tokens": 5000}, "max_completion_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
])
def test_unsupported_chat_parameters(server, http, fields, param):
    assert_error(http.post("/v1/chat/completions", json=chat(server, **fields)), 400, param)


@pytest.mark.parametrize("fields, param", [
    ({"best_of": 3}, "best_of"), ({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"),
    ({"logprobs": 2}, "logprobs"), ({"tools": []}, "tools"),
])
def test_unsupported_completion_parameters(server, http, fields, param):
    assert_error(http.post("/v1/completions", json=completion(server, **fields)), 400, param)


def test_neutral_values_of_unsupported_parameters_are_accepted(server, client):
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=2, presence_penalty=0, frequency_penalty=0, logprobs=False,
                                       response_format={"type": "text"}, parallel_tool_calls=False)
    assert r.choices[0].message.content is not None


def test_unknown_parameter_through_the_client(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=PROMPT, max_tokens=2, extra_body={"top_a": 1})
    assert e.value.status_code == 400 and e.value.body["param"] == "top_a"


def test_unknown_model(server, http, client):
    assert_error(http.post("/v1/completions", json=completion(server, model="gpt-4")), 404, "model",
                 "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_unknown_path_and_method(http):
    assert_error(http.get("/v1/nothing"), 404, None)
    assert_error(http.get("/v1/completions"), 405, None)


def test_invalid_json_and_wrong_body(server, http):
    assert_error(http.post("/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"}),
                 400, None, "invalid_json")
    assert_error(http.post("/v1/completions", json=[1, 2]), 400, None)
    assert_error(http.post("/v1/completions", json={"prompt": "x"}), 400, "model")
    # curl -d without a content type: a clear message, not a 422 or 500
    err = assert_error(http.post("/v1/completions", content=b'{"model": "x"}',
                                 headers={"content-type": "application/x-www-form-urlencoded"}), 400, None)
    assert "application/json" in err["message"]


def test_prompt_longer_than_context_is_refused_before_any_work(server, http):
    before = server.metric("cdserve_prompt_tokens_total")
    err = assert_error(http.post("/v1/completions", json=completion(server, prompt=[42] * 1024)), 400,
                       "prompt", "context_length_exceeded")
    assert "1024" in err["message"]
    long_chat = chat(server, messages=[{"role": "user", "content": "hello " * 1100}])
    assert_error(http.post("/v1/chat/completions", json=long_chat), 400, "messages", "context_length_exceeded")
    # fits, but not with the tokens asked for
    assert_error(http.post("/v1/completions", json=completion(server, prompt=[42] * 1000, max_tokens=100)),
                 400, "max_tokens", "context_length_exceeded")
    assert server.metric("cdserve_prompt_tokens_total") == before


def test_refusals_are_counted(server, http):
    before = server.metric("cdserve_requests_total", endpoint="/v1/completions", status="400")
    http.post("/v1/completions", json=completion(server, temperature=9))
    assert server.metric("cdserve_requests_total", endpoint="/v1/completions", status="400") == before + 1


GARBAGE = [None, 1, "x", [], {}, {"model": None}, {"model": [1]}, {"prompt": {"a": 1}},
           {"model": "m", "prompt": [[1, "a"]]}, {"model": "m", "prompt": [[]]}, {"model": "m", "prompt": [-1]},
           {"model": "m", "prompt": "x", "n": 1e300}, {"model": "m", "prompt": "x", "max_tokens": -5},
           {"model": "m", "prompt": "x", "stop": 5}, {"model": "m", "prompt": "x", "control": []},
           {"model": "m", "prompt": "x", "control": {"weights": []}},
           {"model": "m", "prompt": "x", "control": {"weights": {"positive": "a"}}},
           {"model": "m", "prompt": "x", "stream": "yes"}, {"model": "m", "prompt": "x", "stream_options": 1},
           {"messages": [{"role": "user"}]}, {"messages": [{"content": "x"}]}, {"messages": "hi"},
           {"messages": [{"role": "assistant", "content": None}]},
           {"messages": [{"role": "user", "content": "x"}] * 3, "max_tokens": 1e20}]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_no_client_input_gives_500(server, http, path):
    for body in GARBAGE:
        if isinstance(body, dict) and body.get("model") == "m":
            body = {**body, "model": server.model}
        r = http.post(path, json=body)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert_error(r, r.status_code, r.json()["error"]["param"])


@pytest.mark.parametrize("stop, words", [
    (["a", "b", "c", "d", "e"], "at most 4"),  # the list branch's reason, not the string branch's
    ([""], "at least 1 character"),
    (5, "valid string"),
])
def test_a_bad_union_value_gets_the_reason_of_the_branch_its_type_matched(server, http, stop, words):
    err = assert_error(http.post("/v1/completions", json=completion(server, stop=stop)), 400, "stop")
    assert words in err["message"], err["message"]
