"""vLLM's per-step statistics as cdserve StepStats (a vLLM stat logger, in the server process).

vLLM reports each engine step it ran (scheduler and iteration stats) to its stat loggers; this one
turns them into `StepStats` for the engine's listeners (the server's Prometheus metrics). The
scorer's time is inside vLLM's step (the logits processor), so `scorer_seconds` is 0 here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vllm.v1.metrics.loggers import StatLoggerBase

from cdserve.outputs import StepStats

# A gap longer than this between two reports is idle time, not one step (step_seconds 0: untimed).
MAX_STEP_SECONDS = 2.0


class StepStatsLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0, sink: Callable[[StepStats], None] | None = None,
                 on_scheduler: Callable[[int, int], None] | None = None):
        self.sink = sink
        self.on_scheduler = on_scheduler
        self.last: float | None = None

    @classmethod
    def factory(cls, sink: Callable[[StepStats], None], on_scheduler: Callable[[int, int], None]):
        return lambda vllm_config, engine_index=0: cls(vllm_config, engine_index, sink, on_scheduler)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        now = time.monotonic()
        if scheduler_stats is not None and self.on_scheduler is not None:
            self.on_scheduler(scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs)
        if iteration_stats is None:
            return
        step, self.last = (None if self.last is None else now - self.last), now
        if self.sink is None:
            return
        if step is None or step > MAX_STEP_SECONDS:
            step = 0.0  # unknown (idle before it): counted, not timed
        running = scheduler_stats.num_running_reqs if scheduler_stats is not None else 0
        prompt = getattr(iteration_stats, "prompt_token_stats", None)
        self.sink(StepStats(batch_rows=running, step_seconds=step, scorer_seconds=0.0,
                            prefill_tokens=getattr(prompt, "computed", 0) if prompt is not None else 0,
                            candidates_generated=0,
                            forked_tokens=getattr(prompt, "external_kv_transfer", 0) if prompt is not None else 0))

    def log_engine_initialized(self) -> None:
        pass
