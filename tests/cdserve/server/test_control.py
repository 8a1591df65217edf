"""The control extension end to end: every mode, streamed and not, and weights that steer."""

from __future__ import annotations

import pytest

PROMPT = "Hello there"
MODES = [
    {"mode": "none"},
    {"mode": "token", "weights": {"positive": 1.0}, "strength": 5.0, "top_k": 10},
    {"mode": "block", "weights": {"specific": 1.0}, "block_size": 4, "num_candidates": 3},
    {"mode": "best_of_n", "weights": {"concise": 1.0}, "num_candidates": 3},
    {"mode": "block", "block_size": 3, "num_candidates": 2, "selection": "sample", "strength": 2.0},
]


@pytest.mark.parametrize("control", MODES, ids=lambda c: c["mode"] + "-" + c.get("selection", "default"))
def test_each_mode(server, client, control):
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, seed=3,
                                  extra_body={"control": control})
    [choice] = r.choices
    got = choice.model_extra["control"]
    assert got["mode"] == control["mode"]
    assert set(got["values"]) == {"positive", "specific", "concise", "readable"}
    assert r.usage.completion_tokens <= 12
    if control["mode"] in ("block", "best_of_n"):
        assert got["selections"] >= 1
        assert got["tokens_generated"] >= r.usage.completion_tokens  # candidates cost tokens


@pytest.mark.parametrize("control", MODES, ids=lambda c: c["mode"] + "-" + c.get("selection", "default"))
def test_each_mode_streams_like_plain(server, client, control):
    kw = {"model": server.model, "prompt": PROMPT, "max_tokens": 12, "seed": 5, "extra_body": {"control": control}}
    plain = client.completions.create(**kw).choices[0]
    chunks = [c for c in client.completions.create(**kw, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == plain.text
    final = chunks[-1].choices[0]
    assert final.finish_reason == plain.finish_reason
    assert final.model_extra["control"]["values"] == pytest.approx(plain.model_extra["control"]["values"])


def test_block_mode_streams_block_by_block(server, client):
    stream = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Say something."}], max_tokens=12,
        temperature=0.8, seed=7, stream=True, stream_options={"include_usage": True},
        extra_body={"control": {"mode": "block", "block_size": 4, "num_candidates": 2}})
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    usage = chunks[-1].usage
    # one chunk per selected block: ceil(tokens / block_size) of them, not one per token
    assert len(content) <= -(-usage.completion_tokens // 4)


def test_weights_change_the_output(server, client):
    def run(weight: float):
        r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16, temperature=0,
                                      extra_body={"control": {"mode": "token", "strength": 10.0, "top_k": 50,
                                                              "weights": {"positive": weight}}})
        return r.choices[0].text, r.choices[0].model_extra["control"]

    up_text, up = run(1.0)
    down_text, down = run(-1.0)
    plain = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16, temperature=0).choices[0]
    assert up_text != down_text
    assert up["values"]["positive"] > down["values"]["positive"]
    assert plain.model_extra["control"]["kl"] == 0
    # Greedy: the KL to the base model's greedy point mass is 0 until steering changes a token,
    # then infinite, which JSON carries as null.
    for text, control in ((up_text, up), (down_text, down)):
        assert control["kl"] == (0.0 if text == plain.text else None)


def test_strength_zero_with_full_vocabulary_is_plain_decoding(server, client):
    kw = {"model": server.model, "prompt": "The cat", "max_tokens": 10, "temperature": 0.9, "seed": 11}
    plain = client.completions.create(**kw).choices[0].text
    steered = client.completions.create(**kw, extra_body={"control": {
        "mode": "token", "strength": 0.0, "top_k": 0, "weights": {"positive": 1.0}}}).choices[0].text
    assert steered == plain


def test_n_with_control(server, client):
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, n=2, seed=2,
                                  extra_body={"control": {"mode": "block", "block_size": 4, "num_candidates": 2}})
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.model_extra["control"]["mode"] == "block" for c in r.choices)
