"""The hf engine's scheduler (who joins the batch, aborts of waiting requests) and its rows'
state machine (fork and leave events for the KV caches)."""

from __future__ import annotations

import pytest
import torch

from cdserve.admission import Admission
from cdserve.backends.hf.scheduler import Scheduler
from cdserve.backends.hf.sequence import Choice, RequestState, Row, RowState
from cdserve.control.request import ControlConfig, resolve_control
from cdserve.outputs import GenerationRequest
from cdserve.sampling import SamplingParams


def state(rid: str, rows: int, outputs: list | None = None) -> RequestState:
    control = {"mode": "block", "num_candidates": rows} if rows > 1 else {}
    gen = GenerationRequest(rid, [1, 2, 3], SamplingParams(), resolve_control(control, ControlConfig(), ["h"]))
    return RequestState(gen=gen, sink=(outputs if outputs is not None else []).append)


def test_waiting_requests_join_in_arrival_order_while_their_rows_fit():
    s = Scheduler(max_batch_rows=8)
    for rid, rows in [("a", 4), ("b", 3), ("c", 4), ("d", 1)]:
        s.submit(state(rid, rows))
    s.drain()
    assert [x.gen.request_id for x in s.schedule(rows_running=0)] == ["a", "b"]  # c does not fit: d waits behind it
    assert [x.gen.request_id for x in s.schedule(rows_running=7)] == []
    assert [x.gen.request_id for x in s.schedule(rows_running=3)] == ["c", "d"]


def test_the_scheduler_admits_what_the_shared_admission_policy_reports_as_running():
    rows = [4, 3, 4, 1, 2]
    s, a = Scheduler(max_batch_rows=8), Admission(max_batch_rows=8, max_waiting=10)
    for i, r in enumerate(rows):
        st = state(f"r{i}", r)
        s.submit(st)
        a.admit(st.gen, 100)
    s.drain()
    assert len(s.schedule(rows_running=0)) == a.load().running == 2


def test_an_aborted_waiting_request_finishes_empty_and_running_aborts_are_handed_back():
    s = Scheduler(max_batch_rows=2)
    out: list = []
    s.submit(state("w", 1, out))
    s.abort("w")
    s.abort("running-elsewhere")
    assert s.drain() == {"w", "running-elsewhere"}
    assert not s.waiting and not s.has_work()
    assert len(out) == 1 and out[0].finished and out[0].choices == []


def rows(k: int) -> list[Row]:
    choice = Choice(request=state("x", k), ctl=None)  # the transitions do not read the controller
    return [Row(choice=choice, k=i, generator=torch.Generator(), last_token=10 + i) for i in range(k)]


def test_a_row_forks_from_its_winner_only_while_waiting_and_the_fork_is_an_event():
    a, b = rows(2)
    with pytest.raises(RuntimeError, match="fork\\(\\) in state running"):
        b.fork(a)
    a.done()
    b.done()
    a.fork(a)  # the winner goes on from its own cache: no event
    b.fork(a)
    assert a.fork_src is None and b.fork_src is a and b.last_token == a.last_token == 10
    assert a.state is b.state is RowState.RUNNING
    b.leave()  # a row that leaves has nothing left to fork
    assert b.state is RowState.FINISHED and b.fork_src is None
