"""The admission policy both engines share: rows, 400 / 503, and the load it reports."""

from __future__ import annotations

import pytest

from cdserve.admission import Admission
from cdserve.control.request import ControlConfig, resolve_control
from cdserve.engine_protocol import QueueFullError
from cdserve.errors import InvalidRequestError
from cdserve.outputs import GenerationRequest
from cdserve.sampling import SamplingParams

HEADS = ["positive", "concise"]


def req(rid: str, n: int = 1, control: dict | None = None, prompt=(1, 2, 3)) -> GenerationRequest:
    return GenerationRequest(rid, list(prompt), SamplingParams(n=n),
                             resolve_control(control or {}, ControlConfig(), HEADS))


def test_rows_count_every_candidate_and_a_request_that_cannot_fit_is_a_400():
    a = Admission(max_batch_rows=8, max_waiting=4)
    assert a.rows(req("a", n=2, control={"mode": "block", "num_candidates": 4})) == 8
    assert a.rows(req("b", n=3)) == 3
    with pytest.raises(InvalidRequestError) as e:
        a.rows(req("c", n=3, control={"mode": "best_of_n", "num_candidates": 4}))
    assert e.value.param == "n" and "12 rows" in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        a.rows(req("d", control={"mode": "best_of_n", "num_candidates": 9}))
    assert e.value.param == "control.num_candidates"


def test_requests_wait_in_arrival_order_and_max_waiting_counts_requests():
    a = Admission(max_batch_rows=4, max_waiting=2)
    a.admit(req("a", control={"mode": "block", "num_candidates": 3}), 100)  # 3 rows: runs
    a.admit(req("b", n=2), 100)  # 2 more rows do not fit: waits
    a.admit(req("c"), 100)  # would fit, but arrives after b: waits
    assert (a.load().running, a.load().waiting) == (1, 2)
    with pytest.raises(QueueFullError):
        a.admit(req("d"), 100)
    a.release("a")
    assert (a.load().running, a.load().waiting) == (2, 0)


def test_prompt_checks():
    a = Admission(max_batch_rows=4, max_waiting=2)
    with pytest.raises(InvalidRequestError) as e:
        a.admit(req("e", prompt=()), 100)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        a.admit(req("f", prompt=range(100)), 100)
    assert e.value.code == "context_length_exceeded"
    assert not a.in_flight
