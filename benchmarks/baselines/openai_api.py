"""The slice of the OpenAI chat-completions API the baselines serve: request fields they read,
streamed chunks, the usage chunk, the final response, the probes and the model list. Only what
`vllm bench serve` and the openai client need; no validation beyond that (benchmark use only)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def max_tokens(body: dict[str, Any], default: int = 256) -> int:
    return int(body.get("max_completion_tokens") or body.get("max_tokens") or default)


def chunk(cid: str, model: str, content: str | None = None, finish_reason: str | None = None,
          extra: dict[str, Any] | None = None) -> str:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, **(extra or {})}
    return sse({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model, "choices": [choice]})


def usage_chunk(cid: str, model: str, prompt_tokens: int, completion_tokens: int) -> str:
    return sse({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [], "usage": usage(prompt_tokens, completion_tokens)})


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


DONE = "data: [DONE]\n\n"


def response(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
             completion_tokens: int, extra: dict[str, Any] | None = None) -> JSONResponse:
    return JSONResponse({"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": finish_reason, **(extra or {})}],
                         "usage": usage(prompt_tokens, completion_tokens)})


def stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream")


def add_probes(app: FastAPI, model_name: str) -> None:
    """/health, /ready (the app is built after loading, so both answer at once) and /v1/models."""

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "benchmark"}]}
