"""Every series the dashboard and the alert rules read really appears in a running server's
/metrics: `cdserve serve` (the console script, configured by CDSERVE_* variables as in the
containers) on a free loopback port, with the tiny model and scorer from tests/conftest.py."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from deploy_helpers import (
    BUILTIN_SERIES,
    DASHBOARD,
    METRICS,
    RULES,
    dashboard_exprs,
    metric_names,
    rules_exprs,
)

READY_TIMEOUT_S = 300
# hf by default (fast); DEPLOY_TEST_BACKEND=vllm checks the production backend's series too.
BACKEND = os.environ.get("DEPLOY_TEST_BACKEND", "hf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cdserve_command() -> list[str]:
    """`cdserve serve`, as the images run it; `python -m cdserve.server` until the CLI exists."""
    script = Path(sys.executable).parent / "cdserve"
    if script.exists() and importlib.util.find_spec("cdserve.cli") is not None:
        return [str(script), "serve"]
    return [sys.executable, "-m", "cdserve.server"]


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    # vLLM on CPU has no attention kernel for the tiny model's head size: it gets SmolLM2.
    names = (
        ("smollm2_dir", "smollm2_scorer_dir")
        if BACKEND == "vllm"
        else ("tiny_model_dir", "tiny_scorer_dir")
    )
    model_dir, scorer_dir = (request.getfixturevalue(n) for n in names)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDSERVE_")}
    env |= {
        "CDSERVE_MODEL": str(model_dir),
        "CDSERVE_SCORER": str(scorer_dir),
        "CDSERVE_BACKEND": BACKEND,
        "CDSERVE_DEVICE": "auto" if BACKEND == "vllm" else "cpu",
        "CDSERVE_HOST": "127.0.0.1",
        "CDSERVE_PORT": str(port),
        "CDSERVE_MAX_MODEL_LEN": "512",
        "CDSERVE_MAX_TOKENS_LIMIT": "64",
        "CDSERVE_MAX_BATCH_ROWS": "16",
        "CDSERVE_MAX_N": "2",
        "CDSERVE_CONTROL__MAX_NUM_CANDIDATES": "4",
        "CDSERVE_SHUTDOWN_GRACE_SECONDS": "5",
        "CDSERVE_VLLM__KV_CACHE_SPACE_GIB": "1",
        "CDSERVE_VLLM__ENFORCE_EAGER": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if "CDSERVE_CACHE_DIR" in os.environ:
        env["CDSERVE_CACHE_DIR"] = os.environ["CDSERVE_CACHE_DIR"]
    log_path = tmp_path_factory.mktemp("live-metrics") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cdserve_command(), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"cdserve serve exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"not ready after {READY_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def exported(server) -> set[str]:
    """The series names in /metrics after one request of each control mode that has its own
    series (labelled series, scorer and candidate metrics appear only once used)."""
    with httpx.Client(base_url=server, timeout=120) as http:
        assert http.get("/health").status_code == 200
        model = http.get("/v1/models").json()["data"][0]["id"]
        for control in (
            {"mode": "none"},
            {"mode": "token", "weights": {}, "top_k": 5},
            {"mode": "block", "block_size": 2, "num_candidates": 2},
        ):
            body = {"model": model, "prompt": "Hello", "max_tokens": 4, "control": control}
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, (control, r.text)
        text = http.get("/metrics").text
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


def test_health_is_open_and_ready_says_ready(server):
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200
    assert httpx.get(f"{server}/ready", timeout=5).status_code == 200


def test_every_dashboard_series_is_exported(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard))) - BUILTIN_SERIES
    assert used <= exported, (
        f"the dashboard reads series the server does not export: {sorted(used - exported)}"
    )


def test_every_rule_series_is_exported(exported):
    exprs, recorded = rules_exprs(yaml.safe_load(RULES.read_text()))
    used = set().union(*(metric_names(e) for e in exprs)) - BUILTIN_SERIES - recorded
    assert used <= exported, sorted(used - exported)


def test_every_contract_metric_is_exported(exported):
    for name, kind in METRICS.items():
        series = name + "_bucket" if kind == "histogram" else name
        assert series in exported, name
