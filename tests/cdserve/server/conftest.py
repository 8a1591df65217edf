"""Live servers for the HTTP tests: `python -m cdserve.server` in a subprocess on 127.0.0.1 (a
free port), serving the tiny model and scorer from tests/conftest.py with the real `hf` engine.
No mocks: every test talks HTTP to a real server."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

READY_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    proc: subprocess.Popen
    url: str
    log_path: Path
    model: str | None
    api_key: str | None = None

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused",
                             max_retries=0, timeout=60, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused",
                                  max_retries=0, timeout=60)

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def metrics(self) -> dict[str, float]:
        """The server's /metrics as {'name{labels}': value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        total = 0.0
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', rest))
            if all(got.get(k) == v for k, v in labels.items()):
                total += value
        return total

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def server_env() -> dict[str, str]:
    """The test process's environment without any CDSERVE_* setting (except the cache)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDSERVE_") or k == "CDSERVE_CACHE_DIR"}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_server(log_dir: Path, model: Path | str, scorer: Path | str, *flags: str,
                 env: dict[str, str] | None = None, api_key: str | None = None) -> LiveServer:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "cdserve.server", "--model", str(model), "--scorer", str(scorer),
           "--backend", "hf", "--device", "cpu", "--port", str(port), "--log-level", "info", *flags]
    full_env = {**server_env(), **(env or {})}
    if api_key:
        full_env["CDSERVE_API_KEY"] = api_key
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    name = Path(model).name if Path(model).is_dir() else None
    server = LiveServer(proc, f"http://127.0.0.1:{port}", log_path, name, api_key)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-3000:]}")
        try:
            ready = httpx.get(f"{server.url}/ready", timeout=2)
            if ready.status_code == 200:
                server.model = ready.json()["model"]
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S}s:\n{server.log()[-3000:]}")


# The shared server: small limits so the limit tests are cheap, long enough for the slow ones.
TINY_FLAGS = ("--max-model-len", "1024", "--max-tokens-limit", "1000", "--max-batch-rows", "64",
              "--max-n", "4", "--control-max-num-candidates", "8", "--max-body-bytes", "65536")


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model_dir, tiny_scorer_dir):
    srv = start_server(tmp_path_factory.mktemp("server"), tiny_model_dir, tiny_scorer_dir, *TINY_FLAGS)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def launch(tmp_path_factory, tiny_model_dir, tiny_scorer_dir):
    """Start more servers with their own flags (the tiny model unless told otherwise); stopped
    when the module ends."""
    started: list[LiveServer] = []

    def _launch(*flags: str, model=tiny_model_dir, scorer=tiny_scorer_dir, **kw) -> LiveServer:
        srv = start_server(tmp_path_factory.mktemp("server"), model, scorer, *flags, **kw)
        started.append(srv)
        return srv

    yield _launch
    for srv in started:
        srv.stop()
