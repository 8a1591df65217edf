"""Flags and environment variables of sections (the vllm backend's settings): precedence, errors
that name the setting's flag and variable, and old names refused with the new ones."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from cdserve.cli import build_parser, engine_config
from cdserve.config import EngineConfig
from cdserve.config_flags import describe_error
from cdserve.server.cli import load_settings
from cdserve.server.settings import ServerSettings
from cdserve.server.settings import describe_error as describe_settings_error


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("CDSERVE_") and k != "CDSERVE_CACHE_DIR":
            monkeypatch.delenv(k)


def serve(*argv: str):
    return load_settings(build_parser().parse_args(["serve", *argv]))


def generate(*argv: str) -> EngineConfig:
    return engine_config(build_parser().parse_args(["generate", "--prompt", "hi", *argv]))


def test_a_backend_flag_wins_over_its_variable_and_sections_merge(monkeypatch):
    monkeypatch.setenv("CDSERVE_VLLM__KV_CACHE_SPACE_GIB", "3")
    monkeypatch.setenv("CDSERVE_VLLM__ENFORCE_EAGER", "true")
    monkeypatch.setenv("CDSERVE_VLLM", '{"scorer_threads": 2, "tensor_parallel_size": 2}')
    assert serve().vllm.kv_cache_space_gib == 3  # the variable over the default
    s = serve("--vllm-kv-cache-space-gib", "1.5", "--vllm-scorer-threads", "1")
    assert s.vllm.kv_cache_space_gib == 1.5 and s.vllm.scorer_threads == 1  # flags over variables
    assert s.vllm.enforce_eager is True and s.vllm.tensor_parallel_size == 2  # the rest kept
    assert s.vllm.gpu_memory_utilization == 0.85  # defaults for what nobody set
    assert serve("--no-vllm-enforce-eager").vllm.enforce_eager is False
    # the section's JSON flag, its per-field flags winning over it
    s = serve("--vllm", '{"enforce_eager": false, "block_fork_hold_s": 5}', "--vllm-block-fork-hold-s", "0")
    assert (s.vllm.enforce_eager, s.vllm.block_fork_hold_s) == (False, 0)
    assert s.engine_config().vllm == s.vllm


def test_generate_reads_the_same_flags_and_no_environment(monkeypatch):
    monkeypatch.setenv("CDSERVE_VLLM__KV_CACHE_SPACE_GIB", "3")
    cfg = generate("--vllm-enforce-eager", "--vllm", '{"kv_cache_space_gib": 1}', "--control-mode", "token",
                   "--seed", "7")
    assert (cfg.vllm.enforce_eager, cfg.vllm.kv_cache_space_gib) == (True, 1)
    assert cfg.control.mode == "token" and cfg.seed == 7
    assert generate().vllm.kv_cache_space_gib == 4.0


@pytest.mark.parametrize("old, new", [
    (["--kv-cache-space-gib", "2"], "--vllm-kv-cache-space-gib"),
    (["--enforce-eager"], "--vllm-enforce-eager"),
    (["--no-enforce-eager"], "--no-vllm-enforce-eager"),
    (["--tensor-parallel-size", "2"], "--vllm-tensor-parallel-size"),
])
@pytest.mark.parametrize("command", ["serve", "generate"])
def test_old_flags_are_refused_naming_the_new_ones(command, old, new, capsys):
    argv = [command, *old] + (["--prompt", "hi"] if command == "generate" else [])
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{old[0]} was renamed {new}" in err
    assert ("(environment: CDSERVE_VLLM__" in err) == (command == "serve")


def test_old_variables_are_refused_naming_the_new_ones(monkeypatch):
    monkeypatch.setenv("CDSERVE_TENSOR_PARALLEL_SIZE", "2")
    monkeypatch.setenv("CDSERVE_ENFORCE_EAGER", "true")
    with pytest.raises(ValidationError) as e:
        ServerSettings()
    message = describe_settings_error(e.value)
    assert "CDSERVE_TENSOR_PARALLEL_SIZE was renamed CDSERVE_VLLM__TENSOR_PARALLEL_SIZE" in message
    assert "CDSERVE_ENFORCE_EAGER was renamed CDSERVE_VLLM__ENFORCE_EAGER (flag --vllm-enforce-eager)" in message


@pytest.mark.parametrize("env, argv, named", [
    ({}, ["--vllm-gpu-memory-utilization", "2"],
     "invalid setting --vllm-gpu-memory-utilization / CDSERVE_VLLM__GPU_MEMORY_UTILIZATION: "),
    ({"CDSERVE_VLLM__SCORER_THREADS": "0"}, [],
     "invalid setting --vllm-scorer-threads / CDSERVE_VLLM__SCORER_THREADS: "),
    ({}, ["--vllm-distributed-executor-backend", "slurm"],
     "--vllm-distributed-executor-backend / CDSERVE_VLLM__DISTRIBUTED_EXECUTOR_BACKEND: "),
    ({"CDSERVE_VLLM": '{"kv_cache_gib": 1}'}, [], "unknown setting vllm.kv_cache_gib (known: gpu_memory_utilization"),
    ({}, ["--control-weights", '{"civil": "lots"}'], "--control-weights / CDSERVE_CONTROL__WEIGHTS at civil: "),
])
def test_errors_name_a_sections_setting_by_flag_and_variable(monkeypatch, env, argv, named):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError) as e:
        serve(*argv)
    assert named in describe_settings_error(e.value)


def test_generate_errors_name_the_flag():
    with pytest.raises(ValidationError) as e:
        generate("--vllm-kv-cache-space-gib", "0")
    message = describe_error(e.value, EngineConfig, env=False)
    assert message.startswith("invalid setting --vllm-kv-cache-space-gib: ") and "CDSERVE_" not in message
