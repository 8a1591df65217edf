"""Build the engine the configuration asks for; `auto` prefers vLLM when it is installed and works."""

from __future__ import annotations

import importlib.util
import logging

from cdserve.config import EngineConfig
from cdserve.engine_protocol import Engine

log = logging.getLogger(__name__)


def vllm_available() -> tuple[bool, str]:
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed"
    try:
        from cdserve.backends.vllm.engine import VLLMEngine  # noqa: F401
    except Exception as e:  # noqa: BLE001  installed but broken (e.g. mismatched torch): any error
        return False, f"vllm is installed but does not import: {e}"
    return True, "vllm is installed"


def build_engine(config: EngineConfig) -> Engine:
    backend = config.backend
    if backend == "auto":
        ok, why = vllm_available()
        backend = "vllm" if ok else "hf"
        log.info("backend auto: picked %s (%s)", backend, why)
    if backend == "vllm":
        from cdserve.backends.vllm.engine import VLLMEngine

        return VLLMEngine(config)
    from cdserve.backends.hf.engine import HFEngine

    return HFEngine(config)
