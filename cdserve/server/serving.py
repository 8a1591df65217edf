"""From an OpenAI request to engine requests and back: prompt building, limits, control, the
(merged) output streams of one HTTP request, OpenAI response and chunk building, and the request
metrics. Routes call `complete()`; they know nothing of the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from cdserve.control.request import ResolvedControl, resolve_control
from cdserve.engine_protocol import Engine
from cdserve.errors import InvalidRequestError
from cdserve.outputs import ChoiceDelta, ControlValues, GenerationRequest, RequestOutput
from cdserve.server import protocol as p
from cdserve.server.errors import ShuttingDownError, classify
from cdserve.server.metrics import ServerMetrics
from cdserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "the client went away"; only ever seen in metrics


class ClientDisconnected(Exception):
    pass


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    control: ControlValues | None = None


@dataclass
class _Job:
    """One HTTP generation request on its way through the engine."""

    endpoint: str
    response_id: str
    model: str
    mode: str
    n: int
    requests: list[GenerationRequest]
    arrival: float
    prompt_tokens: int = 0
    choices: dict[int, _Choice] = field(default_factory=dict)
    first_token_at: float | None = None
    last_token_at: float | None = None

    def add(self, index: int, delta: ChoiceDelta) -> None:
        choice = self.choices.setdefault(index, _Choice())
        choice.text.append(delta.text)
        if delta.token_ids:
            self.last_token_at = time.monotonic()
            self.first_token_at = self.first_token_at or self.last_token_at
        choice.tokens += len(delta.token_ids)
        if delta.finish_reason == "abort":
            raise ShuttingDownError("the engine aborted the request: the server is shutting down")
        if delta.finish_reason is not None:
            choice.finish_reason, choice.control = delta.finish_reason, delta.control

    def usage(self) -> p.UsageInfo:
        completion = sum(c.tokens for c in self.choices.values())
        return p.UsageInfo(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                           total_tokens=self.prompt_tokens + completion)


async def _prepend(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    try:
        yield first
        async for out in rest:
            yield out
    finally:
        await rest.aclose()  # closing aborts the request in the engine


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several engine requests (one per prompt) as they come, tagged by prompt index.
    Leaving early (error, disconnect) cancels and closes every stream."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
            queue.put_nowait((i, done))
        except Exception as e:  # noqa: BLE001  (re-raised by the consumer)
            queue.put_nowait((i, e))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, coro):
    """Run coro; if the client goes away first, cancel it (which aborts its engine requests)."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            raise ClientDisconnected()
    return work.result()


class OpenAIServing:
    def __init__(self, engine: Engine, settings: ServerSettings, metrics: ServerMetrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self._draining = asyncio.Event()
        self._drain_deadline = 0.0

    # ------------------------------------------------------------------ graceful shutdown
    def begin_drain(self, grace_seconds: float) -> None:
        """SIGTERM: new requests get 503; in-flight ones have grace_seconds to finish, then end
        with a 503 (an error event in a stream) and leave the engine."""
        self._drain_deadline = time.monotonic() + grace_seconds
        self._draining.set()

    async def _until_drained(self, outputs: AsyncIterator) -> AsyncIterator:
        """`outputs`, until the drain deadline passes (then ShuttingDownError)."""
        try:
            while True:
                nxt = asyncio.ensure_future(anext(outputs))
                try:
                    if not self._draining.is_set():
                        drain = asyncio.ensure_future(self._draining.wait())
                        await asyncio.wait({nxt, drain}, return_when=asyncio.FIRST_COMPLETED)
                        drain.cancel()
                    if not nxt.done():
                        await asyncio.wait({nxt}, timeout=max(0.0, self._drain_deadline - time.monotonic()))
                    if not nxt.done():
                        raise ShuttingDownError(f"the server is shutting down and its grace period "
                                                f"({self.settings.shutdown_grace_seconds:g}s) is over")
                    item = nxt.result()
                except StopAsyncIteration:
                    return
                finally:
                    if not nxt.done():
                        nxt.cancel()
                        await asyncio.gather(nxt, return_exceptions=True)
                yield item
        finally:
            await outputs.aclose()

    # ------------------------------------------------------------------ request -> engine requests
    def _check_model(self, model: str) -> None:
        if model != self.engine.model_name:
            raise InvalidRequestError("model", f"the model '{model}' does not exist; this server "
                                      f"serves '{self.engine.model_name}'", 404, "model_not_found")

    def _prompt_ids(self, req: p.CompletionRequest | p.ChatCompletionRequest) -> list[list[int]]:
        tok = self.engine.tokenizer
        if isinstance(req, p.ChatCompletionRequest):
            if not getattr(tok, "chat_template", None):
                raise InvalidRequestError("messages", "this model has no chat template; use /v1/completions")
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001  (the template refuses the conversation: jinja raise_exception)
                raise InvalidRequestError("messages", f"the chat template refused these messages: {e}") from None
            prompts = [tok(text, add_special_tokens=False)["input_ids"]]
        elif isinstance(req.prompt, str):
            prompts = [tok(req.prompt)["input_ids"]]
        elif req.prompt and isinstance(req.prompt[0], str):
            prompts = [tok(text)["input_ids"] for text in req.prompt]
        elif req.prompt and isinstance(req.prompt[0], int):
            prompts = [list(req.prompt)]
        else:
            prompts = [list(ids) for ids in req.prompt]
        if not prompts:
            raise InvalidRequestError("prompt", "must not be an empty list")
        vocab = len(tok)
        param = "messages" if isinstance(req, p.ChatCompletionRequest) else "prompt"
        for ids in prompts:
            if not ids:
                raise InvalidRequestError(param, "must contain at least one token")
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(param, f"token ids must be in [0, {vocab})")
            if len(ids) >= self.engine.max_model_len:
                raise InvalidRequestError(param, f"this model's maximum context length is "
                                          f"{self.engine.max_model_len} tokens; the prompt has "
                                          f"{len(ids)} tokens", code="context_length_exceeded")
        return prompts

    def _sampling(self, req, longest_prompt: int):
        limit = self.settings.max_tokens_limit
        room = self.engine.max_model_len - longest_prompt
        asked = req._max_tokens()
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        default = p.DEFAULT_COMPLETION_MAX_TOKENS if isinstance(req, p.CompletionRequest) else limit
        sampling = req.to_sampling_params(min(default, limit, room))
        try:
            sampling.validate(limit, self.settings.max_n)
        except InvalidRequestError as e:
            if e.param == "max_tokens":
                e.param = param
            raise
        if asked is not None and asked > room:
            raise InvalidRequestError(param, f"this model's maximum context length is "
                                      f"{self.engine.max_model_len} tokens; the prompt has "
                                      f"{longest_prompt} tokens and {param}={asked} would exceed it",
                                      code="context_length_exceeded")
        return sampling

    def _prepare(self, req, endpoint: str, raw: Request) -> _Job:
        arrival = time.monotonic()
        if self._draining.is_set():
            raise ShuttingDownError("the server is shutting down; retry on another replica")
        self._check_model(req.model)
        req.refuse_unsupported()
        control: ResolvedControl = resolve_control(req.control, self.engine.config.control,
                                                   self.engine.head_names)
        raw.state.mode = control.mode
        prompts = self._prompt_ids(req)
        sampling = self._sampling(req, max(len(ids) for ids in prompts))
        response_id = p.new_id("chatcmpl" if endpoint.endswith("chat/completions") else "cmpl")
        requests = [GenerationRequest(request_id=f"{response_id}-{i}", prompt_token_ids=ids,
                                      sampling=sampling, control=control)
                    for i, ids in enumerate(prompts)]
        if req.user:
            log.info("%s for user %r", response_id, req.user)
        return _Job(endpoint, response_id, self.engine.model_name, control.mode, sampling.n,
                    requests, arrival)

    async def _start(self, job: _Job) -> list[AsyncIterator[RequestOutput]]:
        """Submit every engine request; raises (QueueFullError, InvalidRequestError) before any
        response is sent, closing whatever was already submitted."""
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            for gen in job.requests:
                stream = self.engine.generate(gen)
                try:
                    first = await anext(stream)
                except BaseException:
                    await stream.aclose()
                    raise
                job.prompt_tokens += first.prompt_tokens
                streams.append(_prepend(first, stream))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        return streams

    # ------------------------------------------------------------------ the entry point
    async def complete(self, req: p.CompletionRequest | p.ChatCompletionRequest, raw: Request,
                       endpoint: str) -> Response:
        job = self._prepare(req, endpoint, raw)
        self.metrics.in_flight.inc()
        handed_to_stream = False
        try:
            try:
                streams = await cancel_on_disconnect(raw, self._start(job))
            except ClientDisconnected:
                self._record(job, CLIENT_CLOSED)
                return Response(status_code=CLIENT_CLOSED)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                events = self._stream(job, streams, include_usage, isinstance(req, p.ChatCompletionRequest))
                handed_to_stream = True
                # sse-starlette's own shutdown cut-off is a backstop: _until_drained ends the
                # stream (error event, [DONE]) when the grace period is over
                return EventSourceResponse(events, ping=15, sep="\n",
                                           shutdown_grace_period=self.settings.shutdown_grace_seconds + 2)
            try:
                body = await cancel_on_disconnect(raw, self._collect(job, streams, req))
            except ClientDisconnected:
                self._record(job, CLIENT_CLOSED)
                return Response(status_code=CLIENT_CLOSED)
            self._record(job, 200)
            return Response(body.model_dump_json(), media_type="application/json")
        finally:
            if not handed_to_stream:
                self.metrics.in_flight.dec()

    # ------------------------------------------------------------------ non-streaming
    async def _collect(self, job: _Job, streams, req):
        async for prompt_index, out in self._until_drained(_merge(streams)):
            for delta in out.choices:
                job.add(prompt_index * job.n + delta.index, delta)
        indices = sorted(job.choices)
        if isinstance(req, p.ChatCompletionRequest):
            choices = [p.ChatCompletionChoice(
                index=i, message=p.ChatResponseMessage(content="".join(job.choices[i].text)),
                finish_reason=job.choices[i].finish_reason,
                control=p.ChoiceControl.from_values(job.choices[i].control)) for i in indices]
            return p.ChatCompletionResponse(id=job.response_id, created=p.now(), model=job.model,
                                            choices=choices, usage=job.usage())
        choices = [p.CompletionChoice(index=i, text="".join(job.choices[i].text),
                                      finish_reason=job.choices[i].finish_reason,
                                      control=p.ChoiceControl.from_values(job.choices[i].control))
                   for i in indices]
        return p.CompletionResponse(id=job.response_id, created=p.now(), model=job.model,
                                    choices=choices, usage=job.usage())

    # ------------------------------------------------------------------ streaming
    async def _stream(self, job: _Job, streams, include_usage: bool, chat: bool) -> AsyncIterator[str]:
        created = p.now()
        status = CLIENT_CLOSED  # unless the loop below finishes or fails
        try:
            if chat:
                yield self._role_chunk(job, created)
            async for prompt_index, out in self._until_drained(_merge(streams)):
                deltas = []
                for delta in out.choices:
                    index = prompt_index * job.n + delta.index
                    job.add(index, delta)
                    if delta.text or delta.finish_reason:
                        deltas.append((index, delta))
                if deltas:
                    yield self._chunk(job, created, chat, deltas)
            if include_usage:
                chunk_type = p.ChatCompletionStreamResponse if chat else p.CompletionStreamResponse
                yield chunk_type(id=job.response_id, created=created, model=job.model, choices=[],
                                 usage=job.usage()).model_dump_json()
            status = 200
        except Exception as e:  # noqa: BLE001  (after the stream started: an error event, then [DONE])
            error = classify(e)
            status = error.status
            yield json.dumps(error.body())
        finally:
            self._record(job, status)
            self.metrics.in_flight.dec()
        yield "[DONE]"

    def _role_chunk(self, job: _Job, created: int) -> str:
        """OpenAI's first chat chunk: the role of every choice, no content yet."""
        choices = [p.ChatCompletionStreamChoice(index=i, delta=p.ChatDelta(role="assistant", content=""))
                   for i in range(len(job.requests) * job.n)]
        return p.ChatCompletionStreamResponse(id=job.response_id, created=created, model=job.model,
                                              choices=choices).model_dump_json()

    def _chunk(self, job: _Job, created: int, chat: bool, deltas: list[tuple[int, ChoiceDelta]]) -> str:
        if chat:
            choices = [p.ChatCompletionStreamChoice(
                index=i, delta=p.ChatDelta(content=d.text), finish_reason=d.finish_reason,
                control=p.ChoiceControl.from_values(d.control)) for i, d in deltas]
            return p.ChatCompletionStreamResponse(id=job.response_id, created=created, model=job.model,
                                                  choices=choices).model_dump_json()
        choices = [p.CompletionChoice(index=i, text=d.text, finish_reason=d.finish_reason,
                                      control=p.ChoiceControl.from_values(d.control)) for i, d in deltas]
        return p.CompletionStreamResponse(id=job.response_id, created=created, model=job.model,
                                          choices=choices).model_dump_json()

    # ------------------------------------------------------------------ metrics
    def _record(self, job: _Job, status: int) -> None:
        m, mode = self.metrics, job.mode
        m.requests.labels(job.endpoint, mode, str(status)).inc()
        if status != 200:
            return
        now = time.monotonic()
        usage = job.usage()
        m.prompt_tokens.labels(mode).inc(usage.prompt_tokens)
        m.generation_tokens.labels(mode).inc(usage.completion_tokens)
        m.e2e.labels(mode).observe(now - job.arrival)
        if job.first_token_at is not None:
            m.ttft.labels(mode).observe(job.first_token_at - job.arrival)
            longest = max(c.tokens for c in job.choices.values())
            if longest > 1 and job.last_token_at is not None:
                m.tpot.labels(mode).observe((job.last_token_at - job.first_token_at) / (longest - 1))
