"""A scripted engine behind cdserve's engine seam (cdserve/engine_protocol.py), for testing the
serving layer in-process, as vLLM tests its OpenAI layer around a mock engine
(tests/entrypoints/openai/completion/test_completion_error.py): no model, no step loop.

Each request answers the script's tokens, one output per token for every choice. The script can
fail at a given output, hold at one until the test releases it, or refuse the request as a full
queue would. Closing a request's stream before it finished records an abort, as the real engines
do (cdserve/backends/hf/engine.py `generate`); the streams are kept, so only the serving layer
closing them (not garbage collection) can record one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from cdserve.config import EngineConfig
from cdserve.engine_protocol import QueueFullError
from cdserve.outputs import ChoiceDelta, EngineLoad, GenerationRequest, RequestOutput, StepStats


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255) and an EOS; a chat template that lists the turns."""

    chat_template = "{role}: {content}"
    eos_token_id = 256

    def __len__(self) -> int:
        return 257

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(text.encode())}

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


@dataclass
class Script:
    """What every request gets. Output i carries tokens[i] (for each of the n choices); the last
    one finishes with `finish_reason`."""

    tokens: tuple[str, ...] = ("Hel", "lo", " world")
    finish_reason: str = "length"
    fail_at: int | None = None  # raise `error` instead of output number fail_at (0: the first)
    error: BaseException = field(default_factory=lambda: RuntimeError("the engine failed"))
    hold_at: int | None = None  # wait for FakeEngine.release() before output number hold_at


class FakeEngine:
    backend_name = "fake"
    model_name = "fake-model"
    max_model_len = 256
    rewards = None  # the server builds its own reward service

    def __init__(self, script: Script | None = None, config: EngineConfig | None = None):
        self.script = script or Script()
        self.config = config or EngineConfig(max_model_len=self.max_model_len, max_tokens_limit=64)
        self.tokenizer = ByteTokenizer()
        self.scorer_config = None  # only GET /v1/scorers reads it; these tests do not
        self.requests: list[GenerationRequest] = []  # as received, in order
        self.streams: list[AsyncIterator[RequestOutput]] = []  # kept so that only a close aborts
        self.aborted: list[str] = []  # request ids, in the order they were aborted
        self.finished: list[str] = []  # request ids that sent their last output
        self.started = self.stopped = False
        self.holding = asyncio.Event()  # set while some request waits at the script's hold_at
        self._release = asyncio.Event()
        self._listeners: list[Callable[[StepStats], None]] = []

    @property
    def head_names(self) -> list[str]:
        return ["positive", "civil"]

    async def start(self) -> None:
        self.started = True

    async def shutdown(self, grace_seconds: float = 0.0) -> None:
        self.stopped = True

    def release(self) -> None:
        """Let every request held at the script's hold_at go on."""
        self._release.set()

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        self.requests.append(request)
        stream = self._outputs(request)
        self.streams.append(stream)
        return stream

    async def _outputs(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        s, n = self.script, request.sampling.n
        finished = False
        try:
            for i, token in enumerate(s.tokens):
                if i == s.hold_at:
                    self.holding.set()
                    await self._release.wait()
                if i == s.fail_at:
                    raise s.error
                finished = i == len(s.tokens) - 1
                reason = s.finish_reason if finished else None
                yield RequestOutput(request.request_id, len(request.prompt_token_ids), finished=finished,
                                    choices=[ChoiceDelta(c, token, [i], reason) for c in range(n)])
        finally:
            if finished:
                self.finished.append(request.request_id)
            else:  # the caller went away (disconnect, deadline) or the engine failed
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def load(self) -> EngineLoad:
        return EngineLoad(waiting=0, running=len(self.requests) - len(self.aborted) - len(self.finished))

    def add_stats_listener(self, listener: Callable[[StepStats], None]) -> None:
        self._listeners.append(listener)


class FullQueueEngine(FakeEngine):
    """Requests after the first `admit` are refused, as an engine whose waiting queue is full
    refuses them."""

    def __init__(self, admit: int = 0, script: Script | None = None):
        super().__init__(script)
        self.admit = admit

    def _outputs(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if len(self.requests) <= self.admit:
            return super()._outputs(request)
        return self._refuse()

    async def _refuse(self) -> AsyncIterator[RequestOutput]:
        raise QueueFullError("1 requests are waiting (max_waiting=1); retry later")
        yield  # an async generator: the error comes at the first output, as from the real engines
