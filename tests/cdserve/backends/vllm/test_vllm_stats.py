"""cdserve's metrics on vLLM without a model: vLLM's IterationStats as StepStats, the worker's
scorer clock, and the engine's stats plumbing (candidates, server-side scorer calls)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.metrics.stats import IterationStats, PrefillStats

from cdserve.backends.vllm.stats import (
    ScorerClock,
    StepStatsLogger,
    scorer_clock,
    step_stats,
    timed_apply,
)
from cdserve.outputs import StepStats


def iteration(itl=(), ttft=(), computed=0, external=0) -> IterationStats:
    it = IterationStats()
    it.inter_token_latencies_iter = list(itl)
    it.time_to_first_tokens_iter = list(ttft)
    if computed or external:
        p = PrefillStats()
        p.set(computed + external, 0, external)
        it.prompt_token_stats.update_from_output(p)
    return it


def test_step_time_is_the_shortest_inter_token_latency_and_rows_count_sequences():
    # Three sequences continued (one after a preemption), two started: one step of 40 ms, 5 rows.
    s = step_stats(iteration(itl=[0.040, 0.041, 3.0], ttft=[0.2, 0.3], computed=12, external=32))
    assert s == StepStats(batch_rows=5, step_seconds=0.040, prefill_tokens=12, forked_tokens=32)


def test_a_step_of_first_tokens_only_is_counted_not_timed():
    s = step_stats(iteration(ttft=[5.0, 5.0]))  # after idle: no continuing sequence
    assert s.batch_rows == 2 and s.step_seconds == 0.0


def test_the_logger_reports_each_step_and_the_scheduler():
    seen, sched = [], []
    logger = StepStatsLogger.factory(seen.append, lambda r, w: sched.append((r, w)))(None)

    class Sched:
        num_running_reqs, num_waiting_reqs = 3, 1

    logger.record(Sched(), iteration(itl=[0.01]))
    logger.record(Sched(), None)  # a scheduler-only report (no outputs): no step
    assert [s.step_seconds for s in seen] == [0.01] and sched == [(3, 1), (3, 1)]


class FakeProcessor:
    def __init__(self, rows):
        self.rows = rows

    @timed_apply
    def apply(self, logits):
        return logits * 2


def test_timed_apply_keeps_one_time_per_step_with_rows_and_take_empties_it():
    busy, idle = FakeProcessor([1]), FakeProcessor([])
    x = torch.ones(2, 3)
    assert torch.equal(busy.apply(x), x * 2) and torch.equal(idle.apply(x), x * 2)
    busy.apply(x)
    times = scorer_clock(busy).take()
    assert len(times) == 2 and all(t > 0 for t in times)
    assert scorer_clock(busy).take() == [] and scorer_clock(idle).take() == []


def test_clock_is_bounded():
    clock = ScorerClock(maxlen=3)
    clock.steps.extend([0.1, 0.2, 0.3, 0.4])
    assert clock.take() == [0.2, 0.3, 0.4]


def test_engine_reports_candidates_and_server_side_scorer_calls():
    from cdserve.backends.vllm.engine import VLLMEngine
    from cdserve.config import EngineConfig

    eng = VLLMEngine(EngineConfig(backend="vllm"))
    seen = []
    eng.add_stats_listener(seen.append)
    eng.count_candidates(8)
    assert eng._timed_scorer_call(lambda a, b: a + b, 1, 2) == 3
    assert seen[0] == StepStats(candidates_generated=8)
    assert seen[1].batch_rows is None and seen[1].scorer_seconds > 0
