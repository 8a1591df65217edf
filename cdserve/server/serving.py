"""From an OpenAI request to engine requests and back: prompt building, limits, control, the
(merged) output streams of one HTTP request, OpenAI response and chunk building, and the request
metrics. Routes call `complete()`; they know nothing of the engine.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from cdserve.control.request import ResolvedControl, resolve_control
from cdserve.engine_protocol import Engine
from cdserve.errors import InvalidRequestError
from cdserve.outputs import ChoiceDelta, GenerationRequest
from cdserve.sampling import SamplingParams
from cdserve.server import protocol as p
from cdserve.server.errors import ShuttingDownError, classify
from cdserve.server.metrics import ServerMetrics
from cdserve.server.settings import ServerSettings
from cdserve.server.streams import ClientDisconnected, Drain, Job, cancel_on_disconnect

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "the client went away"; only ever seen in metrics


class OpenAIServing:
    def __init__(self, engine: Engine, settings: ServerSettings, metrics: ServerMetrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.drain = Drain()

    # ------------------------------------------------------------------ request -> engine requests
    def reward_names(self) -> list[str]:
        """The rewards control.rewards may name: those of the engine's reward service."""
        service = getattr(self.engine, "rewards", None)
        return [r["name"] for r in service.describe()] if service is not None else []

    def _check_model(self, model: str) -> None:
        if model != self.engine.model_name:
            raise InvalidRequestError("model", f"the model '{model}' does not exist; this server "
                                      f"serves '{self.engine.model_name}'", 404, "model_not_found")

    def _prompt_ids(self, req: p.CompletionRequest | p.ChatCompletionRequest) -> list[list[int]]:
        tok = self.engine.tokenizer
        if isinstance(req, p.ChatCompletionRequest):
            if not getattr(tok, "chat_template", None):
                raise InvalidRequestError("messages", "this model has no chat template; use /v1/completions")
            try:
                text = tok.apply_chat_template(req.template_messages(), tokenize=False,
                                               add_generation_prompt=True)
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

    def _sampling(self, req: p.CompletionRequest | p.ChatCompletionRequest, longest_prompt: int) -> SamplingParams:
        """Sampling parameters within the server's limits and the context left by the prompt.
        An omitted max_tokens is capped to fit; one asked for that does not fit is refused."""
        limit = self.settings.max_tokens_limit
        room = self.engine.max_model_len - longest_prompt
        asked, param = req.requested_max_tokens()
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

    def _prepare(self, req: p.CompletionRequest | p.ChatCompletionRequest, endpoint: str,
                 raw: Request) -> Job:
        """Every check that can refuse the request, before any work; the engine requests."""
        arrival = time.monotonic()
        if self.drain.started:
            raise ShuttingDownError("the server is shutting down; retry on another replica")
        self._check_model(req.model)
        # the mode label of this request's metrics, should it be refused from here on
        raw.state.mode = (req.control and req.control.mode) or self.engine.config.control.mode
        control: ResolvedControl = resolve_control(req.control_request(), self.engine.config.control,
                                                   self.engine.head_names, self.reward_names())
        prompts = self._prompt_ids(req)
        sampling = self._sampling(req, max(len(ids) for ids in prompts))
        response_id = p.new_id("chatcmpl" if endpoint.endswith("chat/completions") else "cmpl")
        requests = [GenerationRequest(request_id=f"{response_id}-{i}", prompt_token_ids=ids,
                                      sampling=sampling, control=control)
                    for i, ids in enumerate(prompts)]
        if req.user:
            log.debug("%s for user %r", response_id, req.user)
        return Job(endpoint, response_id, self.engine.model_name, control.mode, sampling.n, requests, arrival)

    # ------------------------------------------------------------------ the entry point
    async def complete(self, req: p.CompletionRequest | p.ChatCompletionRequest, raw: Request,
                       endpoint: str) -> Response:
        """Serve one completion or chat completion request, streamed or not."""
        job = self._prepare(req, endpoint, raw)
        self.metrics.in_flight.inc()
        chat = isinstance(req, p.ChatCompletionRequest)
        try:
            # best_of_n's first output is its whole answer: the start too ends at the drain deadline
            await cancel_on_disconnect(raw, self.drain.wait(job.start(self.engine.generate)))
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                # The stream's own finally finishes the job; the background task covers a client
                # that left before the stream started. sse-starlette's shutdown cut-off is only a
                # backstop: Drain ends the stream (error event, [DONE]) when the grace is over.
                # No keep-alive comments (ping=0): vLLM's benchmark client (`vllm bench serve`)
                # loses every event after a `: ping` that arrives alone in a read, so answers
                # longer than the ping interval came back cut short (issue 11, problem 7; vLLM's
                # own server sends none either). Events flow from the first token on.
                return EventSourceResponse(
                    self._stream(job, include_usage, chat), ping=0, sep="\n",
                    background=BackgroundTask(self._finish, job, CLIENT_CLOSED),
                    shutdown_grace_period=self.settings.shutdown_grace_seconds + 2)
            body = await cancel_on_disconnect(raw, self._collect(job, chat))
        except ClientDisconnected:
            await self._finish(job, CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        except Exception:
            await self._finish(job, None)  # the error handler answers and counts it
            raise
        except BaseException:  # cancelled (server shutdown past its backstop)
            await self._finish(job, CLIENT_CLOSED)
            raise
        await self._finish(job, 200)
        return Response(body.model_dump_json(), media_type="application/json")

    async def _finish(self, job: Job, status: int | None) -> None:
        """Close the job's engine streams and record it (status None: not here), once."""
        await job.close()
        if not job.done:
            job.done = True
            self.metrics.in_flight.dec()
            if status is not None:
                self._record(job, status)

    # ------------------------------------------------------------------ non-streaming
    async def _collect(self, job: Job, chat: bool) -> p.CompletionResponse | p.ChatCompletionResponse:
        async for _ in self.drain.until_deadline(job.outputs()):
            pass
        choices = [(i, job.choices[i]) for i in sorted(job.choices)]
        if chat:
            return p.ChatCompletionResponse(
                id=job.response_id, created=p.now(), model=job.model, usage=job.usage(), choices=[
                    p.ChatCompletionChoice(index=i, message=p.ChatResponseMessage(content="".join(c.text)),
                                           finish_reason=c.finish_reason,
                                           control=p.ChoiceControl.from_values(c.control))
                    for i, c in choices])
        return p.CompletionResponse(
            id=job.response_id, created=p.now(), model=job.model, usage=job.usage(), choices=[
                p.CompletionChoice(index=i, text="".join(c.text), finish_reason=c.finish_reason,
                                   control=p.ChoiceControl.from_values(c.control))
                for i, c in choices])

    # ------------------------------------------------------------------ streaming
    async def _stream(self, job: Job, include_usage: bool, chat: bool) -> AsyncIterator[str]:
        created = p.now()
        status = CLIENT_CLOSED  # unless the loop below finishes or fails
        try:
            if chat:
                yield self._role_chunk(job, created)
            async for index, delta in self.drain.until_deadline(job.outputs()):
                if delta.text or delta.finish_reason:
                    yield self._chunk(job, created, chat, index, delta)
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
            await self._finish(job, status)
        yield "[DONE]"

    def _role_chunk(self, job: Job, created: int) -> str:
        """OpenAI's first chat chunk: the role of every choice, no content yet."""
        choices = [p.ChatCompletionStreamChoice(index=i, delta=p.ChatDelta(role="assistant", content=""))
                   for i in range(len(job.requests) * job.n)]
        return p.ChatCompletionStreamResponse(id=job.response_id, created=created, model=job.model,
                                              choices=choices).model_dump_json()

    def _chunk(self, job: Job, created: int, chat: bool, index: int, delta: ChoiceDelta) -> str:
        control = p.ChoiceControl.from_values(delta.control)
        if chat:
            choice = p.ChatCompletionStreamChoice(index=index, delta=p.ChatDelta(content=delta.text),
                                                  finish_reason=delta.finish_reason, control=control)
            return p.ChatCompletionStreamResponse(id=job.response_id, created=created, model=job.model,
                                                  choices=[choice]).model_dump_json()
        choice = p.CompletionChoice(index=index, text=delta.text, finish_reason=delta.finish_reason,
                                    control=control)
        return p.CompletionStreamResponse(id=job.response_id, created=created, model=job.model,
                                          choices=[choice]).model_dump_json()

    # ------------------------------------------------------------------ metrics
    def _record(self, job: Job, status: int) -> None:
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
