"""The serving layer's failure paths, in-process around a scripted engine (tests/cdserve/server/
fake_engine.py), as vLLM tests its OpenAI layer around a mock engine: an engine error before the
first token and in the middle of a stream, a client that goes away, the shutdown drain, a full
queue. Each runs in milliseconds; the live-server tests keep what needs a real process (SIGTERM
through uvicorn, the real engine's batch)."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgi_call import Call, client, running
from fake_engine import FakeEngine, FullQueueEngine, Script

from cdserve.errors import InvalidRequestError
from cdserve.server.app import build_app
from cdserve.server.settings import ServerSettings

pytestmark = pytest.mark.anyio

COMPLETION = {"model": "fake-model", "prompt": "Hi", "max_tokens": 3}
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
PATHS = {"completion": ("/v1/completions", COMPLETION), "chat": ("/v1/chat/completions", CHAT)}
INTERNAL = {"message": "internal server error", "type": "internal_error", "param": None, "code": None}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def app_for(engine: FakeEngine, **settings):
    return build_app(ServerSettings(retry_after_seconds=3, **settings), engine)


def requests_counted(app, endpoint: str, status: int) -> float:
    value = app.state.cdserve.metrics.registry.get_sample_value(
        "cdserve_requests_total", {"endpoint": endpoint, "mode": "none", "status": str(status)})
    return value or 0.0


def in_flight(app) -> float:
    return app.state.cdserve.metrics.registry.get_sample_value("cdserve_requests_in_flight")


async def drain(state) -> None:
    """SIGTERM's handler, then a turn of the loop for the deadline it schedules there."""
    state.begin_drain()
    await asyncio.sleep(0)


# ------------------------------------------------------------------ engine errors


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_engine_error_before_the_first_token_is_a_500_that_reveals_nothing(stream):
    """Nothing was sent yet: a plain OpenAI error body, even for a stream, counted as a 500."""
    app = app_for(FakeEngine(Script(fail_at=0, error=RuntimeError("CUDA error: secret detail"))))
    async with running(app), client(app) as http:
        r = await http.post("/v1/completions", json={**COMPLETION, "stream": stream})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json() == {"error": INTERNAL}
    assert requests_counted(app, "/v1/completions", 500) == 1 and in_flight(app) == 0


async def test_an_engine_refusal_before_the_first_token_is_a_400_naming_the_parameter():
    refusal = InvalidRequestError("n", "n x num_candidates = 2 x 4 = 8 rows exceeds the server's max_batch_rows=4")
    app = app_for(FakeEngine(Script(fail_at=0, error=refusal)))
    async with running(app), client(app) as http:
        r = await http.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 400
    assert r.json() == {"error": {"message": f"n: {refusal.message}", "type": "invalid_request_error",
                                  "param": "n", "code": None}}


@pytest.mark.parametrize("kind", ["completion", "chat"])
async def test_an_engine_error_mid_stream_ends_it_with_an_error_event_then_done(kind):
    path, body = PATHS[kind]
    app = app_for(FakeEngine(Script(tokens=("Hel", "lo", " world"), fail_at=2)))
    async with running(app), client(app) as http:
        r = await http.post(path, json={**body, "stream": True})
    assert r.status_code == 200  # the stream had started
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    role = 1 if kind == "chat" else 0  # chat's first chunk carries the role only
    choices = [json.loads(e)["choices"][0] for e in events[role:-2]]
    texts = [c["delta"]["content"] if kind == "chat" else c["text"] for c in choices]
    assert texts == ["Hel", "lo"]
    assert json.loads(events[-2]) == {"error": INTERNAL}
    assert events[-1] == "[DONE]"
    assert requests_counted(app, path, 500) == 1 and in_flight(app) == 0


async def test_an_engine_error_mid_answer_without_streaming_is_a_500():
    app = app_for(FakeEngine(Script(fail_at=2)))
    async with running(app), client(app) as http:
        r = await http.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 500 and r.json() == {"error": INTERNAL}


# ------------------------------------------------------------------ the client goes away


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_client_that_goes_away_aborts_its_engine_requests(stream):
    """Both prompts' engine requests are aborted (closed unfinished), and the request is counted
    as 499, not as served."""
    engine = FakeEngine(Script(hold_at=1))
    app = app_for(engine)
    async with running(app):
        call = Call(app, "/v1/completions", {**COMPLETION, "prompt": ["Hi", "Yo"], "n": 2, "stream": stream})
        if stream:
            await call.wait_for(lambda c: len(c.events) >= 1, "the first event")
        else:
            await asyncio.wait_for(engine.holding.wait(), 5)
        assert engine.aborted == []
        call.disconnect()
        await call.finish()
        assert sorted(engine.aborted) == sorted(r.request_id for r in engine.requests)
        assert len(engine.aborted) == 2 and engine.finished == []
        assert requests_counted(app, "/v1/completions", 499) == 1
        assert requests_counted(app, "/v1/completions", 200) == 0 and in_flight(app) == 0


async def test_a_client_that_stays_gets_everything_and_aborts_nothing():
    """The control case of the test above: the same call, the client stays."""
    engine = FakeEngine(Script(hold_at=1))
    app = app_for(engine)
    async with running(app):
        call = Call(app, "/v1/completions", {**COMPLETION, "prompt": ["Hi", "Yo"], "n": 2})
        await asyncio.wait_for(engine.holding.wait(), 5)
        engine.release()
        await call.finish()
    assert call.status == 200 and engine.aborted == []
    choices = call.json()["choices"]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in choices] == [
        (i, "Hello world", "length") for i in range(4)]


# ------------------------------------------------------------------ the drain (SIGTERM)


async def test_after_sigterm_new_requests_get_503_with_retry_after():
    engine = FakeEngine()
    app = app_for(engine)
    async with running(app) as state, client(app) as http:
        await drain(state)
        r = await http.post("/v1/completions", json=COMPLETION)
        ready = await http.get("/ready")
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == "shutting_down"
    assert r.json()["error"]["type"] == "service_unavailable_error"
    assert ready.status_code == 503 and engine.requests == []


async def test_in_flight_requests_finish_within_the_grace_period():
    engine = FakeEngine(Script(hold_at=1))
    app = app_for(engine, shutdown_grace_seconds=5)
    async with running(app) as state, client(app) as http:
        call = Call(app, "/v1/completions", {**COMPLETION, "stream": True})
        await call.wait_for(lambda c: len(c.events) >= 1, "the first event")
        await drain(state)
        refused = await http.post("/v1/completions", json=COMPLETION)
        engine.release()
        await call.finish()
    assert refused.status_code == 503
    assert call.events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["text"] for e in call.events[:-1]] == ["Hel", "lo", " world"]
    assert json.loads(call.events[-2])["choices"][0]["finish_reason"] == "length"
    assert engine.aborted == []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_past_the_grace_period_in_flight_requests_are_cancelled(stream):
    """A stream that started ends with a shutting_down error event, then [DONE]; a whole answer
    is a 503; either way the engine request is aborted."""
    engine = FakeEngine(Script(hold_at=1))
    app = app_for(engine, shutdown_grace_seconds=0.05)
    async with running(app) as state:
        call = Call(app, "/v1/completions", {**COMPLETION, "stream": stream})
        await asyncio.wait_for(engine.holding.wait(), 5)
        await drain(state)
        await call.finish()
    if stream:
        assert call.status == 200 and call.events[-1] == "[DONE]"
        assert json.loads(call.events[-2])["error"]["code"] == "shutting_down"
    else:
        assert call.status == 503 and call.json()["error"]["code"] == "shutting_down"
    assert engine.aborted == [engine.requests[0].request_id]
    assert requests_counted(app, "/v1/completions", 503) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_past_the_grace_period_a_request_with_no_output_yet_is_a_503(stream):
    """best_of_n sends nothing until its N answers are done: the wait for the first output ends
    at the deadline too, before any response started (so a 503 even for a stream)."""
    engine = FakeEngine(Script(hold_at=0))
    app = app_for(engine, shutdown_grace_seconds=0.05)
    async with running(app) as state:
        call = Call(app, "/v1/completions", {**COMPLETION, "stream": stream})
        await asyncio.wait_for(engine.holding.wait(), 5)
        await drain(state)
        await call.finish()
    assert call.status == 503 and call.json()["error"]["code"] == "shutting_down"
    assert engine.aborted == [engine.requests[0].request_id]


# ------------------------------------------------------------------ a full queue


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_full_queue_is_a_503_with_retry_after(stream):
    app = app_for(FullQueueEngine())
    async with running(app), client(app) as http:
        r = await http.post("/v1/completions", json={**COMPLETION, "stream": stream})
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == "queue_full"
    assert r.json()["error"]["type"] == "service_unavailable_error"
    assert requests_counted(app, "/v1/completions", 503) == 1 and in_flight(app) == 0


async def test_a_request_refused_after_some_of_its_prompts_started_aborts_those():
    """Two prompts: the engine takes the first and refuses the second. The first one's stream
    (suspended after its first output, not being read) is closed: aborted, not left running."""
    engine = FullQueueEngine(admit=1, script=Script(hold_at=1))
    app = app_for(engine)
    async with running(app), client(app) as http:
        r = await http.post("/v1/completions", json={**COMPLETION, "prompt": ["Hi", "Yo"]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
    assert len(engine.requests) == 2 and engine.aborted == [engine.requests[0].request_id]
