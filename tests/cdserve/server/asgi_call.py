"""The FastAPI app driven in-process, with no server and no socket: its lifespan (the engine
starts and stops as under uvicorn), plain requests through httpx's ASGI transport, and raw calls
whose client can go away in the middle of the response."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from cdserve.server.state import ServerState

TIMEOUT_S = 5.0  # a test that waits this long has failed; it does not hang


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[ServerState]:
    """The app between start-up (its engine loaded) and shutdown."""
    async with app.router.lifespan_context(app):
        state: ServerState = app.state.cdserve
        async with asyncio.timeout(TIMEOUT_S):
            while state.status == "loading":
                await asyncio.sleep(0)
        yield state


def client(app: FastAPI) -> httpx.AsyncClient:
    # raise_app_exceptions=False: an unforeseen error is the 500 a client sees (uvicorn logs it)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://cdserve.test")


class Call:
    """One POST sent straight to the ASGI app. The client stays connected until `disconnect()`."""

    def __init__(self, app: FastAPI, path: str, body: dict):
        raw = json.dumps(body).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "server": ("cdserve.test", 80), "client": ("127.0.0.1", 1234),
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(raw)).encode())]}
        self.messages: list[dict] = []
        self._body, self._gone = raw, asyncio.Event()
        self.task = asyncio.create_task(app(scope, self._receive, self._send))

    async def _receive(self) -> dict:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict) -> None:
        self.messages.append(message)

    def disconnect(self) -> None:
        self._gone.set()

    async def wait_for(self, predicate: Callable[[Call], bool], what: str) -> None:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                while not predicate(self) and not self.task.done():
                    await asyncio.sleep(0.001)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; got {self.messages}") from None
        if self.task.done() and self.task.exception() is not None:
            raise self.task.exception()
        assert predicate(self), f"the app finished without {what}; got {self.messages}"

    async def finish(self) -> None:
        """Wait for the app to finish the call. (Not `await` under a timeout: cancelling the call
        would look like a client that went away, and the app would answer it.)"""
        await asyncio.wait({self.task}, timeout=TIMEOUT_S)
        if not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            raise AssertionError(f"the app did not finish the call in {TIMEOUT_S}s; got {self.messages}")
        self.task.result()

    @property
    def status(self) -> int | None:
        start = next((m for m in self.messages if m["type"] == "http.response.start"), None)
        return None if start is None else start["status"]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def events(self) -> list[str]:
        """The data of each server-sent event so far."""
        return [line.removeprefix("data: ") for line in self.body.decode().splitlines()
                if line.startswith("data: ")]
