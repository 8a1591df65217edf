"""Completions and chat completions through the official openai client: plain, streamed, n>1,
usage, stop, seed, prompt forms, and the documents the server publishes."""

from __future__ import annotations

import httpx
from transformers import AutoTokenizer

PROMPT = "Hello there"


def test_completion(server, client, tiny_model_dir):
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.model == server.model and r.id.startswith("cmpl-")
    [choice] = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert r.usage.prompt_tokens == len(tok(PROMPT)["input_ids"])
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    control = choice.model_extra["control"]  # cdserve's extension on every choice
    assert control["mode"] == "none" and set(control["values"]) == {"positive", "specific", "concise", "readable"}


def test_chat_completion(server, client):
    r = client.chat.completions.create(model=server.model, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_completion_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    [choice] = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 5
    assert r.usage.prompt_tokens > 10  # the chat template wraps the messages


def test_chat_uses_the_models_chat_template(server, client, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = len(tok(text, add_special_tokens=False)["input_ids"])
    r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=1)
    assert r.usage.prompt_tokens == expected


def test_streamed_completion_matches_plain(server, client):
    kw = {"model": server.model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    plain = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.text
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [f.finish_reason for f in finals] == ["length"]
    assert finals[0].model_extra["control"]["mode"] == "none"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_chat(server, client):
    stream = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage is None  # no include_usage: no usage chunk


def test_raw_sse_ends_with_done(server):
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2


def test_n_choices(server, client):
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, n=3, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    per_choice = [c.model_extra["control"]["tokens_generated"] for c in r.choices]
    assert r.usage.completion_tokens == sum(per_choice) and all(1 <= t <= 5 for t in per_choice)
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, n=2, stream=True)
    finished = [ch.index for c in chat for ch in c.choices if ch.finish_reason]
    assert sorted(finished) == [0, 1]


def test_prompt_list_gives_n_choices_per_prompt(server, client):
    r = client.completions.create(model=server.model, prompt=["Hello there", "The cat"], max_tokens=3,
                                  n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: same prompt, same text
    assert r.usage.prompt_tokens == 4  # each prompt counted once, not n times


def test_token_id_prompt(server, client, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(PROMPT)["input_ids"]
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=5, temperature=0)
    by_text = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_seed_reproduces(server, client):
    kw = {"model": server.model, "prompt": "The cat", "max_tokens": 10, "temperature": 1.0, "seed": 1234}
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_stop_string(server, client):
    full = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=10, temperature=0).choices[0]
    stop = full.text[3:6]  # somewhere inside the greedy output
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=10, temperature=0,
                                  stop=[stop], user="tester-1")
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text and full.text.startswith(r.choices[0].text)


def test_models_and_scorers(server, client):
    [model] = client.models.list().data
    assert model.id == server.model and model.model_extra["max_model_len"] == 1024
    scorers = httpx.get(f"{server.url}/v1/scorers", timeout=10).json()["data"]
    [scorer] = scorers
    assert [h["name"] for h in scorer["heads"]] == ["positive", "specific", "concise", "readable"]
    assert all(h["description"] for h in scorer["heads"])
    assert scorer["defaults"]["mode"] == "none" and scorer["defaults"]["weights"] == {"positive": 1.0}
    assert scorer["ranges"]["num_candidates"] == {"min": 1, "max": 8}
    assert scorer["trained"] is False


def test_health_ready_openapi(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json()["status"] == "ready"
    doc = httpx.get(f"{server.url}/openapi.json").json()
    paths = doc["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/scorers", "/health",
                 "/ready", "/metrics"):
        assert path in paths, path
    schemas = doc["components"]["schemas"]
    union = schemas["CompletionRequest"]["properties"]["control"]["anyOf"][0]  # a union on mode
    assert union["discriminator"]["propertyName"] == "mode"
    control: set[str] = set()
    for ref in union["discriminator"]["mapping"].values():
        branch = schemas[ref.rsplit("/", 1)[1]]
        for inner in branch.get("oneOf", [branch]):  # block/best_of_n: a union on selection
            control |= set(schemas[inner["$ref"].rsplit("/", 1)[1]]["properties"] if "$ref" in inner
                           else inner["properties"])
    assert {"mode", "weights", "strength", "top_k", "block_size", "num_candidates", "selection"} <= control
    assert "control" in schemas["ChatCompletionRequest"]["properties"]
    assert "control" in schemas["CompletionChoice"]["properties"]
    assert "400" in paths["/v1/completions"]["post"]["responses"]
    assert "text/event-stream" in paths["/v1/completions"]["post"]["responses"]["200"]["content"]


def test_explicit_nulls_take_the_defaults(server):
    nulls = dict.fromkeys(["n", "stream", "stream_options", "temperature", "top_p", "max_tokens", "stop",
                           "seed", "user", "control", "logit_bias", "presence_penalty"])
    r = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": PROMPT, **nulls},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["usage"]["completion_tokens"] <= 16
    r = httpx.post(f"{server.url}/v1/chat/completions", json={
        "model": server.model, "messages": [{"role": "developer", "content": "Be kind."},
                                            {"role": "user", "content": "Hi"}],
        "max_completion_tokens": None, "max_tokens": 3, **nulls}, timeout=60)
    assert r.status_code == 200, r.text
