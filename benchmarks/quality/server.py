"""Start a `cdserve serve` subprocess for the quality benchmarks and wait until it is ready."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(flags: list[str], threads: int, log_path: Path, timeout: float) -> tuple[subprocess.Popen, str]:
    """`cdserve serve` with these flags on a free port, its output in log_path; returns the process
    and its URL once /ready answers 200 (the process group is killed if it does not in time)."""
    import httpx

    port = free_port()
    exe = ROOT / ".venv" / "bin" / "cdserve"
    cmd = [str(exe) if exe.exists() else "cdserve", "serve", "--port", str(port), *flags, "--log-level", "warning"]
    print("starting:", shlex.join(cmd), flush=True)
    # One torch thread: on a shared CPU, oversubscribed OpenMP threads spin-wait (several times slower).
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(2)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError(f"server not ready after {timeout}s; see {log_path}")
