"""Start a server of the config on a free loopback port, wait until it is ready, measure its
resident memory, stop it. Every process started here is stopped here (its whole process group),
also when a run fails or the user presses Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from benchmarks.load.config import ServerSpec

HOST = "127.0.0.1"  # loopback only: the benchmark never listens on or calls another address


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def resolve_model_dir(model: str) -> Path:
    """'smollm2' -> the cached safetensors copy of the embedded model; a folder -> itself."""
    if model == "smollm2":
        from prefix_scorers.base_model import default_cache_dir, resolve_model

        return Path(resolve_model("smollm2", default_cache_dir()))
    return Path(model)


def command(spec: ServerSpec, port: int, upstream_url: str = "") -> tuple[list[str], str]:
    """The server's command line and its readiness path."""
    py = sys.executable
    if spec.kind == "cdserve":
        return [py, "-m", "cdserve.server", "--host", HOST, "--port", str(port), "--model", spec.model,
                "--backend", spec.backend, "--scorer", spec.scorer, *spec.args], "/ready"
    if spec.kind == "vllm":
        return [py, "-m", "vllm.entrypoints.openai.api_server", "--host", HOST, "--port", str(port),
                "--model", str(resolve_model_dir(spec.model)), *spec.args], "/health"
    if spec.kind == "args":
        return [py, "-m", "benchmarks.baselines.args_server", "--host", HOST, "--port", str(port),
                "--model", spec.model, "--scorer", spec.scorer, *spec.args], "/ready"
    if spec.kind == "best_of_n":
        return [py, "-m", "benchmarks.baselines.best_of_n_proxy", "--host", HOST, "--port", str(port),
                "--upstream", upstream_url, "--n", str(spec.num_candidates), *spec.args], "/ready"
    raise ValueError(f"unknown server kind {spec.kind!r}")


# Counters the runner records per run (deltas) for cdserve servers.
COUNTERS = ("cdserve_generation_tokens_total", "cdserve_candidates_generated_total", "cdserve_prefill_tokens_total",
            "cdserve_reward_calls_total", "cdserve_reward_texts_total", "cdserve_reward_call_seconds_sum",
            "cdserve_reward_call_seconds_count")


@dataclass
class Server:
    spec: ServerSpec
    proc: subprocess.Popen
    base_url: str
    log_path: Path
    model_id: str = ""
    ready_info: dict | None = None  # what the readiness probe answered (cdserve: model, scorer, backend)

    def rss_bytes(self) -> int:
        """Resident memory of the server and its children (vLLM runs its engine in a child)."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def wait_ready(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.spec.name} exited with {self.proc.returncode} "
                                   f"before it was ready; log: {self.log_path}")
            try:
                probe = httpx.get(self.base_url + path, timeout=5)
                if probe.status_code == 200:
                    try:
                        self.ready_info = probe.json()
                    except ValueError:
                        self.ready_info = None
                    models = httpx.get(self.base_url + "/v1/models", timeout=10).json()["data"]
                    self.model_id = models[0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"server {self.spec.name} not ready after {timeout_s:.0f}s; log: {self.log_path}")

    def counters(self) -> dict[str, float]:
        """cdserve's cumulative counters in COUNTERS (summed over labels) from /metrics, so a run's
        deltas give e.g. reward-call seconds per answer token; {} if the server has no /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            r = httpx.get(self.base_url + "/metrics", timeout=10)
        except httpx.HTTPError:
            return {}
        if r.status_code != 200:
            return {}
        out = dict.fromkeys(COUNTERS, 0.0)
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                if sample.name in out:
                    out[sample.name] += sample.value
        return out

    def refusal(self, control: dict | None) -> str | None:
        """The server's error message if it refuses a request with this control (the load tool
        records only the HTTP reason, e.g. 'Bad Request'); None if it accepts it."""
        body = {"model": self.model_id, "messages": [{"role": "user", "content": "Hi"}],
                "max_completion_tokens": 2}
        if control:
            body["control"] = control
        r = httpx.post(self.base_url + "/v1/chat/completions", json=body, timeout=300)
        if r.status_code < 400:
            return None
        return f"HTTP {r.status_code}: {r.text[:300]}"

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after `grace_s`."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass


def start_server(spec: ServerSpec, log_dir: Path, ready_timeout_s: float,
                 upstream_url: str = "") -> Server:
    port = free_port()
    argv, ready_path = command(spec, port, upstream_url)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{spec.name}.log"
    for i in range(2, 100):  # a restarted server keeps its earlier log
        if not log_path.exists():
            break
        log_path = log_dir / f"server-{spec.name}-{i}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
    with log_path.open("w") as log:
        log.write(" ".join(argv) + "\n")
        log.flush()
        # Own process group: stop() reaches vLLM's engine-core child too.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    server = Server(spec, proc, f"http://{HOST}:{port}", log_path)
    try:
        server.wait_ready(ready_path, ready_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server
