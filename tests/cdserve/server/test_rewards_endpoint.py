"""The server's side of the reward service: its settings (flags, CDSERVE_REWARDS__*), its metrics,
and, on a live server, GET /v1/rewards and a request ranking by an HTTP reward model served here."""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


class ShortIsGood(BaseHTTPRequestHandler):
    """An HTTP reward model: 1 / (1 + characters)."""

    def do_POST(self):
        texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["texts"]
        data = json.dumps({"scores": [1 / (1 + len(t)) for t in texts]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def short_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ShortIsGood)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/score"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
def test_v1_rewards_lists_and_requests_use_them(launch, short_url):
    rewards = {**HTTP_REWARDS, "short": short_url}
    srv = launch("--rewards-http", json.dumps(rewards), "--rewards-http-range", '{"toxicity": [0, 1]}')
    with srv.http() as http:
        r = http.get("/v1/rewards")
        assert r.status_code == 200, r.text
        body = r.json()
        paths = http.get("/openapi.json").json()["paths"]
        r = http.post("/v1/completions", json={
            "model": srv.model, "prompt": "Hello", "max_tokens": 6, "seed": 1,
            "control": {"mode": "best_of_n", "num_candidates": 3, "weights": {}, "rewards": {"short": 1.0}}})
        assert r.status_code == 200, r.text
        assert set(r.json()["choices"][0]["control"]["rewards"]) == {"short"}
    assert srv.metric("cdserve_reward_calls_total", reward="short", outcome="ok") >= 1
    assert srv.metric("cdserve_reward_call_seconds_count", reward="short") >= 1
    assert body["object"] == "list"
    rewards = {d["name"]: d for d in body["data"]}
    assert {"civility", "concise", "readable", "vader_compound", "toxicity", "helpful"} <= set(rewards)
    assert rewards["vader_compound"] == {"name": "vader_compound", "kind": "python", "range": [-1.0, 1.0],
                                         "description": "Positive sentiment: VADER compound score."}
    assert rewards["toxicity"] == {"name": "toxicity", "kind": "http", "range": [0.0, 1.0],
                                   "description": "HTTP reward model (configured at start-up)"}
    assert rewards["helpful"]["range"] == [None, None]  # no declared range: unbounded
    assert "/v1/rewards" in paths
