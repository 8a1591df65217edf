"""Streams are read in full by vLLM's benchmark client (`vllm bench serve --backend openai-chat`,
the tool behind benchmarks/load) however long they last.

That client strips every network read and keeps whatever is not a complete `data: ` JSON event in
its buffer; an SSE comment (sse-starlette's keep-alive `: ping - <time>`, sent every 15 s by
default) that arrives alone in a read stays there without its blank line, every later event is
appended to it, and the rest of the answer, the usage chunk and `[DONE]` are silently lost while
the request still counts as a success. That was problem 7 of issue 11 ("short answers under load"):
at 64 streams answers ended about 15 s after their first token (7 to 9 tokens at 2 s per token).
The server therefore sends no keep-alive comments. A real hf engine (the tiny model) whose
outputs are spaced like a loaded server's makes one stream outlast the old 15 s interval."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest

pytest.importorskip("vllm")

from cdserve.backends.hf.engine import HFEngine
from cdserve.server.app import build_app
from cdserve.server.settings import ServerSettings

pytestmark = pytest.mark.slow

DELAY_S = 0.4  # between engine outputs: 48 tokens take about 19 s, past the old 15 s ping
TOKENS = 48
PING_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlowEngine(HFEngine):
    """The real hf engine, its outputs spaced out like those of a server under load."""

    async def generate(self, request):
        async for out in super().generate(request):
            await asyncio.sleep(DELAY_S)
            yield out


@pytest.fixture(scope="module")
def slow_server(tiny_model_dir, tiny_scorer_dir):
    import uvicorn

    settings = ServerSettings(model=str(tiny_model_dir), scorer=str(tiny_scorer_dir), backend="hf",
                              device="cpu", max_model_len=1024, max_tokens_limit=512)
    app = build_app(settings, SlowEngine(settings.engine_config()))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.2)
    yield url, httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
    server.should_exit = True
    thread.join(30)


def test_a_stream_longer_than_the_keepalive_interval_is_read_in_full_by_vllm_bench(slow_server):
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_chat_completions,
    )

    url, model = slow_server
    prompt = "Tell me a long story about a lighthouse keeper and the sea."
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS,
            "temperature": 0.0}
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    assert whole["usage"]["completion_tokens"] == TOKENS  # no early EOS: the stream will outlast the ping

    async def bench_client():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            return await async_request_openai_chat_completions(RequestFuncInput(
                prompt=prompt, api_url=f"{url}/v1/chat/completions", prompt_len=-1, output_len=TOKENS,
                model=model, extra_body={"temperature": 0.0}), session)

    started = time.monotonic()
    out = asyncio.run(bench_client())
    assert time.monotonic() - started > PING_S + 2  # the stream outlasted the old keep-alive interval
    assert out.success, out.error
    # Every token of the answer arrived ...
    assert out.generated_text == whole["choices"][0]["message"]["content"]
    # ... and so did the usage chunk (without it the tool keeps its own prompt_len, here -1, and
    # counts the tokens of the text it got).
    assert (out.prompt_len, out.output_tokens) == (whole["usage"]["prompt_tokens"], TOKENS)
