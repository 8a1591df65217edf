"""Uncertainty over HTTP: a server with an ensemble scorer says which heads have uncertainty,
reports each head's spread next to its value, and validates control.risk; a scorer without an
ensemble reports no spread."""

from __future__ import annotations

import httpx
import pytest
import torch

from prefix_scorers.base_model import load_model, load_tokenizer
from prefix_scorers.checkpoint import DEFAULT_HEADS, init_from_base, save_scorer
from prefix_scorers.config import EnsembleSpec


@pytest.fixture(scope="module")
def ensemble_server(launch, tmp_path_factory, tiny_model_dir):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    scorer = init_from_base(model, tok, DEFAULT_HEADS, num_layers=1, seed=2, base_name="tiny-llama",
                            ensemble=EnsembleSpec(size=3, method="random"))
    with torch.no_grad():
        scorer.head_proj.mul_(8.0)
    return launch("--max-tokens-limit", "64", scorer=save_scorer(scorer, tmp_path_factory.mktemp("ens")))


def _chat(srv, control: dict) -> httpx.Response:
    with srv.http() as http:
        return http.post("/v1/chat/completions", json={
            "model": srv.model, "messages": [{"role": "user", "content": "Tell me about cats."}],
            "max_tokens": 6, "temperature": 0, "control": control})


def test_scorers_endpoint_marks_heads_with_uncertainty(ensemble_server, server):
    info = httpx.get(f"{ensemble_server.url}/v1/scorers").json()["data"][0]
    assert all(h["uncertainty"] and h["ensemble_size"] == 3 for h in info["heads"])
    assert info["defaults"]["risk"] == 0.0 and info["ranges"]["risk"] == {"min": -1, "max": 1}
    plain = httpx.get(f"{server.url}/v1/scorers").json()["data"][0]
    assert not any(h["uncertainty"] for h in plain["heads"])


@pytest.mark.parametrize("mode", [{"mode": "token", "strength": 2.0}, {"mode": "best_of_n", "num_candidates": 2}])
def test_choices_report_spread_next_to_values(ensemble_server, mode):
    r = _chat(ensemble_server, {**mode, "risk": -0.5})
    assert r.status_code == 200, r.text
    control = r.json()["choices"][0]["control"]
    assert set(control["spread"]) == set(control["values"]) == {h.name for h in DEFAULT_HEADS}
    assert all(s > 0 for s in control["spread"].values())


def test_risk_out_of_range_is_a_400_naming_it(ensemble_server):
    r = _chat(ensemble_server, {"mode": "token", "risk": 1.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "control.risk", r.text
    message = r.json()["error"]["message"]  # a known field out of range, not an unknown one
    assert "less than or equal to 1" in message or "between -1.0 and 1.0" in message, message


def test_no_spread_without_an_ensemble(server):
    r = _chat(server, {"mode": "token", "risk": 0.5})
    assert r.status_code == 200 and "spread" not in r.json()["choices"][0]["control"]


def test_openapi_documents_risk(ensemble_server):
    doc = httpx.get(f"{ensemble_server.url}/openapi.json").json()
    risks = [s["properties"]["risk"] for s in doc["components"]["schemas"].values()
             if "risk" in s.get("properties", {})]
    assert risks and any("mean + risk * spread" in r.get("description", "") for r in risks)
    bounds = [b for r in risks for b in r.get("anyOf", [r]) if "minimum" in b]
    assert bounds and all(b["minimum"] == -1 and b["maximum"] == 1 for b in bounds)
