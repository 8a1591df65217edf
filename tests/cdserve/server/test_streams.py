"""The engine streams of one HTTP request (cdserve/server/streams.py) alone: merging one stream per
prompt, choice indices and usage across prompts, the shutdown deadline, the client going away."""

from __future__ import annotations

import asyncio

import pytest

from cdserve.outputs import ChoiceDelta, RequestOutput
from cdserve.server.errors import ShuttingDownError
from cdserve.server.streams import ClientDisconnected, Drain, Job, cancel_on_disconnect, merge

pytestmark = pytest.mark.anyio
TIMEOUT_S = 5.0


@pytest.fixture
def anyio_backend():
    return "asyncio"


def out(text: str, index: int = 0, finished: bool = False, tokens: int = 1, prompt_tokens: int = 3,
        reason: str | None = None) -> RequestOutput:
    reason = reason or ("stop" if finished else None)
    return RequestOutput("r", prompt_tokens, [ChoiceDelta(index, text, list(range(tokens)), reason)], finished)


class Scripted:
    """An engine stream fed by the test, one output at a time; records being closed unfinished."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False
        self.reads = 0
        self.stream = self._run()

    async def _run(self):
        finished = False
        try:
            while not finished:
                item = await self.queue.get()
                self.reads += 1
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self.closed = not finished


async def until(predicate, what: str) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        while not predicate():
            await asyncio.sleep(0.001)


async def result(task: asyncio.Task):
    """The task's result, once it finished by itself. (Not wait_for: its timeout cancels the task,
    and work that answers a cancellation, as cancel_on_disconnect does, would look finished.)"""
    await asyncio.wait({task}, timeout=TIMEOUT_S)
    assert task.done(), f"not finished after {TIMEOUT_S}s"
    return task.result()


def texts(items) -> list[tuple[int, str]]:
    return [(i, o.choices[0].text) for i, o in items]


# ------------------------------------------------------------------ merge


async def test_merge_sends_the_firsts_then_each_output_as_it_comes():
    a, b = Scripted(), Scripted()
    got: list = []
    consumer = asyncio.create_task(_collect(merge([out("a0"), out("b0")], [a.stream, b.stream]), got))
    for stream, item in ((b, out("b1")), (a, out("a1")), (b, out("b2", finished=True)),
                         (a, out("a2", finished=True))):
        seen = len(got)
        stream.queue.put_nowait(item)
        await until(lambda seen=seen: len(got) > seen, "the merged output")
    await result(consumer)
    assert texts(got) == [(0, "a0"), (1, "b0"), (1, "b1"), (0, "a1"), (1, "b2"), (0, "a2")]


async def test_merge_does_not_read_a_stream_whose_first_output_finished_it():
    done, live = Scripted(), Scripted()
    live.queue.put_nowait(out("b1", finished=True))
    async with asyncio.timeout(TIMEOUT_S):
        got = [x async for x in merge([out("a0", finished=True), out("b0")], [done.stream, live.stream])]
    assert texts(got) == [(0, "a0"), (1, "b0"), (1, "b1")]
    assert done.reads == 0


async def test_an_error_in_one_stream_ends_the_merge_and_stops_reading_the_others():
    a, b = Scripted(), Scripted()  # a never sends again
    b.queue.put_nowait(RuntimeError("engine failed"))
    with pytest.raises(RuntimeError, match="engine failed"):
        async with asyncio.timeout(TIMEOUT_S):
            async for _ in merge([out("a0"), out("b0")], [a.stream, b.stream]):
                pass
    assert a.closed  # its reader was cancelled: the stream was closed unfinished


async def _collect(items, into: list) -> None:
    async for x in items:
        into.append(x)


# ------------------------------------------------------------------ a job's choices


async def test_choices_are_numbered_across_prompts_and_usage_adds_up():
    """Two prompts, n = 2: prompt p's choice c is choice p * 2 + c. Usage: prompt tokens of both
    prompts (3 + 5), completion tokens of every delta (2 + 1 + 1 + 3 + 1 + 1)."""
    p0, p1 = Scripted(), Scripted()
    job = Job("/v1/completions", "cmpl-1", "m", "none", n=2, requests=[])
    job.streams = [p0.stream, p1.stream]
    job.firsts = [RequestOutput("p0", 3, [ChoiceDelta(0, "A", [1, 2]), ChoiceDelta(1, "B", [3])]),
                  RequestOutput("p1", 5, [ChoiceDelta(1, "D", [4])])]
    job.prompt_tokens = 3 + 5
    p0.queue.put_nowait(RequestOutput("p0", 3, [ChoiceDelta(0, "a", [5], "stop"),
                                                ChoiceDelta(1, "b", [6, 7, 8], "length")], finished=True))
    p1.queue.put_nowait(RequestOutput("p1", 5, [ChoiceDelta(0, "C", [9], "stop"),
                                                ChoiceDelta(1, "d", [10], "stop")], finished=True))
    async with asyncio.timeout(TIMEOUT_S):
        indices = [i async for i, _ in job.outputs()]
    assert sorted(indices) == [0, 0, 1, 1, 2, 3, 3]
    assert {i: ("".join(c.text), c.tokens, c.finish_reason) for i, c in job.choices.items()} == {
        0: ("Aa", 3, "stop"), 1: ("Bb", 4, "length"), 2: ("C", 1, "stop"), 3: ("Dd", 2, "stop")}
    usage = job.usage()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (8, 10, 18)


async def test_an_engine_abort_of_a_choice_is_the_shutdown_error():
    job = Job("/v1/completions", "cmpl-1", "m", "none", n=1, requests=[])
    job.firsts, job.streams = [out("x", reason="abort", finished=True)], [Scripted().stream]
    with pytest.raises(ShuttingDownError):
        async with asyncio.timeout(TIMEOUT_S):
            async for _ in job.outputs():
                pass


# ------------------------------------------------------------------ the drain


async def test_before_the_drain_work_runs_to_its_end():
    drain = Drain()
    assert await drain.wait(asyncio.sleep(0.01, result="done")) == "done"
    assert not drain.started


async def test_after_the_deadline_waiting_work_is_cancelled():
    drain, cancelled = Drain(), asyncio.Event()

    async def forever():
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    task = asyncio.create_task(drain.wait(forever()))
    await asyncio.sleep(0)
    drain.begin(0.05)
    assert drain.started
    with pytest.raises(ShuttingDownError, match="grace period \\(0.05s\\) is over"):
        await result(task)
    assert cancelled.is_set()


async def test_outputs_flow_until_the_deadline_then_the_source_is_closed():
    drain, source = Drain(), Scripted()
    got: list = []

    async def read():
        async for x in drain.until_deadline(source.stream):
            got.append(x.choices[0].text)

    reader = asyncio.create_task(read())
    drain.begin(0.5)  # draining: outputs still flow within the grace period
    source.queue.put_nowait(out("a"))
    await until(lambda: got == ["a"], "an output during the grace period")
    with pytest.raises(ShuttingDownError):
        await result(reader)
    assert source.closed


# ------------------------------------------------------------------ the client goes away


class FakeRequest:
    def __init__(self):
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_a_client_that_stays_gets_the_result():
    assert await cancel_on_disconnect(FakeRequest(), asyncio.sleep(0.01, result=7)) == 7


async def test_a_client_that_goes_away_cancels_the_work():
    request, cancelled = FakeRequest(), asyncio.Event()

    async def forever():
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    task = asyncio.create_task(cancel_on_disconnect(request, forever()))
    await asyncio.sleep(0)
    request.gone.set()
    with pytest.raises(ClientDisconnected):
        await result(task)
    assert cancelled.is_set()
