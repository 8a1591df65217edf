"""End to end on the real embedded model, the way `make serve` runs it: SmolLM2-135M-Instruct
(`--model smollm2`) and the default scorer (or its untrained stand-in), through the openai client."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(launch, smollm2_dir):  # smollm2_dir: the GGUF converted once into the cache
    return launch("--max-model-len", "2048", model="smollm2", scorer="default")


def test_serves_the_embedded_default(smol):
    assert smol.model == "SmolLM2-135M-Instruct"
    client = smol.client()
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    r = client.chat.completions.create(model=smol.model, temperature=0, max_tokens=24, messages=[
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 24


def test_steered_stream_on_the_real_model(smol):
    heads = [h["name"] for h in httpx.get(f"{smol.url}/v1/scorers").json()["data"][0]["heads"]]
    client = smol.client()
    for control in ({"mode": "token", "weights": {heads[0]: 1.0}, "strength": 2.0},
                    {"mode": "block", "weights": {heads[0]: 1.0}, "block_size": 4, "num_candidates": 2}):
        stream = client.chat.completions.create(
            model=smol.model, max_tokens=16, seed=0, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Write one sentence about the sea."}],
            extra_body={"control": control})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        final = next(c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason)
        assert text.strip() and chunks[-1].usage.completion_tokens <= 16
        assert final.model_extra["control"]["mode"] == control["mode"]
        assert set(final.model_extra["control"]["values"]) == set(heads)
