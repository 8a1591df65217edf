"""cdserve's metrics on the vLLM backend: vLLM's per-step statistics as StepStats (server process)
and the scorer's time inside the worker (the logits processor).

Step time. vLLM 0.32 reports, per engine step, `IterationStats` (built from the engine core's
output timestamps) and `SchedulerStats`. The only per-step duration in them is
`SchedulerStats.iteration_details.elapsed_ms`, off by default (`enable_logging_iteration_details`,
which also makes vLLM's console logger print a line per step) and not a step time: it times the
wait for the model's output after the step was dispatched, so with the single-process executor
(one GPU, or the CPU) the forward pass, which runs at dispatch, is not in it. What is in every
step's IterationStats is each continuing sequence's inter-token latency: the engine core's time
between its previous output and this one. A sequence that got a token in both steps makes that
exactly one engine iteration (schedule, forward pass, logits processors, sampling, bookkeeping),
idle time excluded: the engine steps back to back while it has running sequences. The step time
is the smallest of them (a sequence that was preempted or skipped a step has a larger one). A
step with no continuing sequence (only first tokens, e.g. the first after idle) is not timed.

Batch rows: the sequences that got a token in the step (one inter-token latency or one
time-to-first-token each); vLLM runs each of a request's n x K candidates as its own sequence,
so every candidate counts, as on hf.

Scorer time. The scorer runs inside vLLM's step, in the worker (`ScorerLogitsProcessor.apply`),
so the server's stat logger cannot see it. `timed_apply` (a decorator on `apply`) keeps each
step's time in the worker (`ScorerClock`: wall time on the CPU; CUDA events on a GPU, so the
time is the kernels' and no synchronisation is added); the engine fetches the batch every
SCORER_POLL_S while vLLM steps, through the worker extension (`cdserve_scorer_steps`, one
collective_rpc), and reports one StepStats per step. One rpc per half second costs the engine
loop nothing measurable; one per step would put a round trip between every two steps.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable

from vllm.v1.metrics.loggers import StatLoggerBase

from cdserve.outputs import StepStats

# How often the server fetches the worker's scorer step times while vLLM steps (seconds).
SCORER_POLL_S = 0.5
# Scorer step times a worker keeps before the oldest are dropped (if nobody fetches them).
SCORER_STEPS_KEPT = 10_000


class StepStatsLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0, sink: Callable[[StepStats], None] | None = None,
                 on_scheduler: Callable[[int, int], None] | None = None):
        self.sink = sink
        self.on_scheduler = on_scheduler

    @classmethod
    def factory(cls, sink: Callable[[StepStats], None], on_scheduler: Callable[[int, int], None] | None = None):
        return lambda vllm_config, engine_index=0: cls(vllm_config, engine_index, sink, on_scheduler)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if scheduler_stats is not None and self.on_scheduler is not None:
            self.on_scheduler(scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs)
        if iteration_stats is None or self.sink is None:
            return
        self.sink(step_stats(iteration_stats))

    def log_engine_initialized(self) -> None:
        pass


def step_stats(iteration_stats) -> StepStats:
    """One vLLM engine step's IterationStats as StepStats (see the module's docstring)."""
    itl = list(getattr(iteration_stats, "inter_token_latencies_iter", ()))
    first = getattr(iteration_stats, "time_to_first_tokens_iter", ())
    step = min(itl) if itl else 0.0
    prompt = getattr(iteration_stats, "prompt_token_stats", None)
    return StepStats(batch_rows=len(itl) + len(first), step_seconds=max(step, 0.0),
                     prefill_tokens=getattr(prompt, "computed", 0) if prompt is not None else 0,
                     forked_tokens=getattr(prompt, "external_kv_transfer", 0) if prompt is not None else 0)


# -- in the worker ---------------------------------------------------------------------------------
class ScorerClock:
    """The logits processor's time per step, kept in the worker until the server takes it."""

    def __init__(self, maxlen: int = SCORER_STEPS_KEPT):
        self.steps: deque = deque(maxlen=maxlen)  # seconds, or (start, end) CUDA events

    def take(self) -> list[float]:
        out = []
        while self.steps:
            step = self.steps.popleft()
            if isinstance(step, tuple):
                start, end = step
                end.synchronize()
                out.append(start.elapsed_time(end) / 1000.0)
            else:
                out.append(step)
        return out


def scorer_clock(processor) -> ScorerClock:
    clock = processor.__dict__.get("scorer_clock")
    if clock is None:
        clock = processor.__dict__["scorer_clock"] = ScorerClock()
    return clock


def timed_apply(apply):
    """Decorates `ScorerLogitsProcessor.apply`: each step with cdserve rows in the batch (token
    mode, or measured KL) has its time kept in the processor's ScorerClock. Steps without any
    cost nothing and are not counted."""

    @functools.wraps(apply)
    def timed(self, logits):
        if not len(self.rows):
            return apply(self, logits)
        clock = scorer_clock(self)
        if logits.is_cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = apply(self, logits)
            end.record()
            clock.steps.append((start, end))
            return out
        started = time.perf_counter()
        out = apply(self, logits)
        clock.steps.append(time.perf_counter() - started)
        return out

    return timed
