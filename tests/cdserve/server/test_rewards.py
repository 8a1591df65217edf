"""The server's side of the reward service: its settings (flags, CDSERVE_REWARDS__*), its metrics,
and GET /v1/rewards on a live server."""

from __future__ import annotations

import argparse
import json
import os

import pytest
from pydantic import ValidationError

from cdserve.rewards import RewardConfig, RewardService
from cdserve.server.cli import add_serve_parser, load_settings
from cdserve.server.metrics import ServerMetrics
from cdserve.server.settings import describe_error

HTTP_REWARDS = {"toxicity": "http://127.0.0.1:9/score", "helpful": "http://127.0.0.1:9/helpful"}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("CDSERVE_") and k != "CDSERVE_CACHE_DIR":
            monkeypatch.delenv(k)
    return monkeypatch


def test_reward_settings_from_flags_and_environment(clean_env):
    clean_env.setenv("CDSERVE_REWARDS__HTTP", json.dumps({"toxicity": HTTP_REWARDS["toxicity"]}))
    clean_env.setenv("CDSERVE_REWARDS__TIMEOUT_S", "3")
    s = load_settings(parse("--rewards-http-range", '{"toxicity": [0, 1]}', "--rewards-python", '["concise"]',
                            "--rewards-max-batch", "32"))
    cfg = s.engine_config().rewards
    assert cfg.http == {"toxicity": HTTP_REWARDS["toxicity"]} and cfg.http_range == {"toxicity": (0, 1)}
    assert (cfg.python, cfg.timeout_s, cfg.max_batch) == (["concise"], 3.0, 32)
    s = load_settings(parse("--rewards", json.dumps({"http": HTTP_REWARDS, "threads": 4})))
    assert s.engine_config().rewards.http == HTTP_REWARDS and s.rewards.threads == 4


@pytest.mark.parametrize("argv, named", [
    (["--rewards-python", '["happy"]'], "--rewards / CDSERVE_REWARDS: unknown Python rewards ['happy']"),
    (["--rewards-http", '{"m": "ftp://x"}'], "must start with http:// or https://"),
    (["--rewards-timeout-s", "0"], "--rewards-timeout-s / CDSERVE_REWARDS__TIMEOUT_S"),
])
def test_bad_reward_settings_are_named(clean_env, argv, named):
    with pytest.raises(ValidationError) as e:
        load_settings(parse(*argv))
    assert named in describe_error(e.value)


def test_reward_calls_are_metrics():
    metrics, service = ServerMetrics(), RewardService(RewardConfig(python=["concise"]))
    metrics.bind_rewards(service)
    try:
        assert service.submit("concise", ["a", "b c"]).result(10) == [0.98, 0.96]
    finally:
        service.close()
    text = metrics.render().decode()
    assert 'cdserve_reward_calls_total{outcome="ok",reward="concise"} 1.0' in text
    assert 'cdserve_reward_call_seconds_count{reward="concise"} 1.0' in text
    assert 'cdserve_reward_texts_total{reward="concise"} 2.0' in text


@pytest.mark.slow
def test_v1_rewards_lists_builtins_and_http_reward_models(launch):
    srv = launch("--rewards-http", json.dumps(HTTP_REWARDS), "--rewards-http-range", '{"toxicity": [0, 1]}')
    with srv.http() as http:
        r = http.get("/v1/rewards")
        assert r.status_code == 200, r.text
        body = r.json()
        paths = http.get("/openapi.json").json()["paths"]
    assert body["object"] == "list"
    rewards = {d["name"]: d for d in body["data"]}
    assert {"civility", "concise", "readable", "vader_compound", "toxicity", "helpful"} <= set(rewards)
    assert rewards["vader_compound"] == {"name": "vader_compound", "kind": "python", "range": [-1.0, 1.0],
                                         "description": "Positive sentiment: VADER compound score."}
    assert rewards["toxicity"] == {"name": "toxicity", "kind": "http", "range": [0.0, 1.0],
                                   "description": "HTTP reward model (configured at start-up)"}
    assert rewards["helpful"]["range"] == [None, None]  # no declared range: unbounded
    assert "/v1/rewards" in paths
