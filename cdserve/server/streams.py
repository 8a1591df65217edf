"""The engine output streams of one HTTP request: what they add up to (`Job`), merging one stream
per prompt, the client going away, and the shutdown deadline. Leaving any of these loops early
closes the engine streams, which aborts their requests in the engine."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from cdserve.outputs import ChoiceDelta, ControlValues, GenerationRequest, RequestOutput
from cdserve.server import protocol as p
from cdserve.server.errors import ShuttingDownError

T = TypeVar("T")
EngineStream = AsyncGenerator[RequestOutput, None]


class ClientDisconnected(Exception):
    """The client closed the connection before the response was complete."""


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    control: ControlValues | None = None


@dataclass
class Job:
    """One HTTP generation request: its engine requests (one per prompt, n choices each), their
    streams once started, and what came back so far."""

    endpoint: str
    response_id: str
    model: str
    mode: str
    n: int
    requests: list[GenerationRequest]
    arrival: float = field(default_factory=time.monotonic)
    streams: list[EngineStream] = field(default_factory=list)
    firsts: list[RequestOutput] = field(default_factory=list)  # read at start: errors come early
    choices: dict[int, Choice] = field(default_factory=dict)
    prompt_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    done: bool = False

    async def start(self, generate) -> None:
        """Submit each engine request and read its first output, so that QueueFullError and
        InvalidRequestError are raised before any response is sent."""
        for gen in self.requests:
            stream = generate(gen)
            self.streams.append(stream)
            self.firsts.append(await anext(stream))
            self.prompt_tokens += self.firsts[-1].prompt_tokens

    async def outputs(self) -> AsyncIterator[tuple[int, ChoiceDelta]]:
        """(global choice index, delta) as they come, across prompts."""
        async for prompt_index, out in merge(self.firsts, self.streams):
            for delta in out.choices:
                index = prompt_index * self.n + delta.index
                self._add(index, delta)
                yield index, delta

    async def close(self) -> None:
        """Close every engine stream (aborting what is unfinished). Idempotent."""
        for stream in self.streams:
            await stream.aclose()

    def _add(self, index: int, delta: ChoiceDelta) -> None:
        choice = self.choices.setdefault(index, Choice())
        choice.text.append(delta.text)
        choice.tokens += len(delta.token_ids)
        if delta.token_ids:
            self.last_token_at = time.monotonic()
            self.first_token_at = self.first_token_at or self.last_token_at
        if delta.finish_reason == "abort":
            raise ShuttingDownError("the engine aborted the request: the server is shutting down")
        if delta.finish_reason is not None:
            choice.finish_reason, choice.control = delta.finish_reason, delta.control

    def usage(self) -> p.UsageInfo:
        completion = sum(c.tokens for c in self.choices.values())
        return p.UsageInfo(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                           total_tokens=self.prompt_tokens + completion)


async def merge(firsts: list[RequestOutput], streams: list[EngineStream]
                ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The first outputs, then the rest of each stream as it comes, tagged by stream index."""
    for i, first in enumerate(firsts):
        yield i, first
    live = [i for i, first in enumerate(firsts) if not first.finished]
    if len(live) == 1:
        async for out in streams[live[0]]:
            yield live[0], out
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int) -> None:
        try:
            async for out in streams[i]:
                queue.put_nowait((i, out))
            queue.put_nowait((i, end))
        except Exception as e:  # noqa: BLE001  (re-raised below, in the consumer)
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in live]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client goes away first, cancel it and raise ClientDisconnected."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientDisconnected()
    return task.result()


class Drain:
    """The shutdown deadline. On SIGTERM new requests are refused and in-flight ones have the
    grace period to finish; after it, their outputs stop with ShuttingDownError."""

    def __init__(self) -> None:
        self._begun: asyncio.Future | None = None  # one future shared by every waiting request
        self._deadline = 0.0
        self._grace = 0.0

    @property
    def started(self) -> bool:
        return self._begun is not None and self._begun.done()

    def _begun_future(self) -> asyncio.Future:
        if self._begun is None:
            self._begun = asyncio.get_running_loop().create_future()
        return self._begun

    def begin(self, grace_seconds: float) -> None:
        """Start draining (on the server's loop)."""
        self._grace, self._deadline = grace_seconds, time.monotonic() + grace_seconds
        if not self._begun_future().done():
            self._begun_future().set_result(None)

    async def wait(self, work: Awaitable[T]) -> T:
        """`await work`, until the deadline passes (then `work` is cancelled: ShuttingDownError)."""
        task = asyncio.ensure_future(work)
        try:
            if not self.started:
                await asyncio.wait({task, self._begun_future()}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                await asyncio.wait({task}, timeout=max(0.0, self._deadline - time.monotonic()))
            if not task.done():
                raise ShuttingDownError(f"the server is shutting down and its grace period "
                                        f"({self._grace:g}s) is over")
            return task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def until_deadline(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """`items`, until the deadline passes (then ShuttingDownError)."""
        items = aiter(items)
        try:
            while True:
                nxt = asyncio.ensure_future(anext(items))
                try:
                    if not self.started:
                        await asyncio.wait({nxt, self._begun_future()}, return_when=asyncio.FIRST_COMPLETED)
                    if not nxt.done():
                        await asyncio.wait({nxt}, timeout=max(0.0, self._deadline - time.monotonic()))
                    if not nxt.done():
                        raise ShuttingDownError(f"the server is shutting down and its grace period "
                                                f"({self._grace:g}s) is over")
                    item = nxt.result()
                except StopAsyncIteration:
                    return
                finally:
                    if not nxt.done():
                        nxt.cancel()
                        await asyncio.gather(nxt, return_exceptions=True)
                yield item
        finally:
            await items.aclose()
