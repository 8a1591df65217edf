"""The seam between the serving layer and the engines (`hf`, `vllm`).

The HTTP layer, the CLI and the benchmarks use only this interface; the control layer and the
backends behind it know nothing of HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

from cdserve.config import EngineConfig
from cdserve.outputs import EngineLoad, GenerationRequest, RequestOutput, StepStats
from prefix_scorers.config import ScorerConfig


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full (HTTP 503 with Retry-After)."""


class Engine(Protocol):
    backend_name: str  # "hf" | "vllm"
    config: EngineConfig
    model_name: str  # the name clients use
    tokenizer: object  # a transformers tokenizer (chat template included)
    scorer_config: ScorerConfig
    max_model_len: int

    @property
    def head_names(self) -> list[str]: ...

    async def start(self) -> None:
        """Load the model and scorer and start the step loop."""

    async def shutdown(self, grace_seconds: float = 0.0) -> None:
        """Finish in-flight requests within the grace period, abort the rest, stop."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream outputs for one request. Raises QueueFullError when the queue is full.
        Closing or cancelling the iterator aborts the request (it leaves the batch at the next
        step and its memory is freed)."""

    def abort(self, request_id: str) -> None: ...

    def load(self) -> EngineLoad: ...

    def add_stats_listener(self, listener: Callable[[StepStats], None]) -> None: ...
