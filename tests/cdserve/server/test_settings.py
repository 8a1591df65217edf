"""`cdserve serve` configuration: flags over CDSERVE_* environment over defaults; bad values stop
start-up with a message naming the setting."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from cdserve.server.cli import add_serve_parser, load_settings
from cdserve.server.settings import ServerSettings, describe_error


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("CDSERVE_") and k != "CDSERVE_CACHE_DIR":
            monkeypatch.delenv(k)


def test_defaults():
    s = load_settings(parse())
    assert (s.host, s.port, s.api_key, s.model, s.scorer) == ("127.0.0.1", 8000, None, "smollm2", "default")
    cfg = s.engine_config()
    assert cfg.max_model_len == 2048 and cfg.control.mode == "none"


def test_environment_and_nested_control(monkeypatch):
    monkeypatch.setenv("CDSERVE_PORT", "9001")
    monkeypatch.setenv("CDSERVE_MAX_WAITING", "7")
    monkeypatch.setenv("CDSERVE_API_KEY", "s3cret")
    monkeypatch.setenv("CDSERVE_CONTROL__STRENGTH", "3.5")
    monkeypatch.setenv("CDSERVE_CONTROL__WEIGHTS", '{"civil": 2}')
    s = load_settings(parse())
    assert s.port == 9001 and s.max_waiting == 7 and s.api_key.get_secret_value() == "s3cret"
    assert s.control.strength == 3.5 and s.control.weights == {"civil": 2.0}
    assert s.engine_config().control.strength == 3.5


def test_control_as_json(monkeypatch):
    monkeypatch.setenv("CDSERVE_CONTROL", '{"mode": "token", "top_k": 5}')
    s = load_settings(parse())
    assert s.control.mode == "token" and s.control.top_k == 5


def test_flags_win_over_environment(monkeypatch):
    monkeypatch.setenv("CDSERVE_PORT", "9001")
    monkeypatch.setenv("CDSERVE_CONTROL__MODE", "token")
    s = load_settings(parse("--port", "9002", "--control-strength", "4", "--max-model-len", "4096"))
    assert s.port == 9002 and s.max_model_len == 4096
    assert s.control.strength == 4 and s.control.mode == "token"  # nested fields merge
    s = load_settings(parse("--control", '{"mode": "block", "block_size": 4}'))
    assert s.control.mode == "block" and s.control.block_size == 4


@pytest.mark.parametrize("argv, named", [
    (["--port", "99999"], "--port / CDSERVE_PORT"),
    (["--max-model-len", "8"], "--max-model-len / CDSERVE_MAX_MODEL_LEN"),
    (["--backend", "tgi"], "--backend / CDSERVE_BACKEND"),
    (["--model", "/no/such/model"], "model='/no/such/model'"),
    (["--scorer", "/no/such/scorer"], "scorer='/no/such/scorer'"),
    (["--max-tokens-limit", "4096"], "max_tokens_limit=4096 must be smaller than max_model_len=2048"),
    (["--control-strength", "500"], "strength=500.0 exceeds max_strength"),
    (["--control-mode", "fast"], "--control-mode / CDSERVE_CONTROL__MODE"),
    (["--shutdown-grace-seconds", "-1"], "--shutdown-grace-seconds / CDSERVE_SHUTDOWN_GRACE_SECONDS"),
    (["--vllm-kv-cache-space-gib", "0"], "--vllm-kv-cache-space-gib / CDSERVE_VLLM__KV_CACHE_SPACE_GIB"),
])
def test_bad_settings_are_named(argv, named):
    with pytest.raises(ValidationError) as e:
        load_settings(parse(*argv))
    assert named in describe_error(e.value)


def test_bad_environment_is_named(monkeypatch):
    monkeypatch.setenv("CDSERVE_MAX_BATCH_ROWS", "lots")
    with pytest.raises(ValidationError) as e:
        ServerSettings()
    assert "--max-batch-rows / CDSERVE_MAX_BATCH_ROWS" in describe_error(e.value)


def test_bad_configuration_stops_start_up():
    proc = subprocess.run([sys.executable, "-m", "cdserve.server", "--port", "8001"],
                          env={**os.environ, "CDSERVE_MAX_MODEL_LEN": "4"}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "--max-model-len / CDSERVE_MAX_MODEL_LEN" in proc.stderr and "got '4'" in proc.stderr


def test_an_old_variable_name_stops_start_up_naming_the_new_one():
    proc = subprocess.run([sys.executable, "-m", "cdserve.server", "--port", "8001"],
                          env={**os.environ, "CDSERVE_KV_CACHE_SPACE_GIB": "1"}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "CDSERVE_KV_CACHE_SPACE_GIB was renamed CDSERVE_VLLM__KV_CACHE_SPACE_GIB" in proc.stderr


def test_engine_that_fails_to_load_stops_the_server(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken-scorer"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "cdserve.server", "--model", str(tiny_model_dir),
                           "--scorer", str(broken), "--backend", "hf", "--device", "cpu", "--port", "0"],
                          env=os.environ, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert "start-up failed" in proc.stderr and "broken-scorer" in proc.stderr
