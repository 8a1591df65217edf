"""The vLLM executor setting reaches vLLM's engine arguments (Ray spans nodes for pipeline
parallelism); 'auto' leaves vLLM's own choice alone."""

import pytest

pytest.importorskip("vllm")

from cdserve.backends.vllm.engine import VLLMEngine
from cdserve.config import EngineConfig
from cdserve.server.settings import ServerSettings


def executor_args(config: EngineConfig) -> dict:
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.config = config
    return engine._executor()


def test_ray_is_passed_through(monkeypatch):
    monkeypatch.setenv("CDSERVE_VLLM__DISTRIBUTED_EXECUTOR_BACKEND", "ray")
    monkeypatch.setenv("CDSERVE_VLLM__PIPELINE_PARALLEL_SIZE", "2")
    config = ServerSettings().engine_config()
    assert (config.vllm.distributed_executor_backend, config.vllm.pipeline_parallel_size) == ("ray", 2)
    assert executor_args(config) == {"distributed_executor_backend": "ray"}


def test_auto_leaves_vllm_to_choose():
    assert executor_args(EngineConfig()) == {}


def test_unknown_executor_is_refused():
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        EngineConfig(vllm={"distributed_executor_backend": "slurm"})
