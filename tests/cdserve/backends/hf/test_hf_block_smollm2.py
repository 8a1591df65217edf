"""Block mode on the real SmolLM2 with the default scorer, sampled (temperature 1): an answer
ends with `stop` only where the base model produced EOS (issue: a losing candidate that had hit
EOS used to keep its finish reason, so the next block stopped after one token, mid-sentence)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cdserve.backends.hf.engine import HFEngine
from cdserve.config import EngineConfig
from cdserve.control.request import resolve_control
from cdserve.outputs import GenerationRequest
from cdserve.sampling import SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = ["Tell me about your weekend.", "Write a short review of a pizza place.",
             "What do you think about rainy days?"]


@pytest.fixture(scope="module")
def engine():
    eng = HFEngine(EngineConfig(backend="hf", device="cpu", dtype="float32", scorer="default",
                                max_batch_rows=96, max_model_len=512, max_tokens_limit=64))
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.shutdown())


async def collect(engine, req):
    ids, finish = [], None
    async for out in engine.generate(req):
        for d in out.choices:
            ids += d.token_ids
            finish = d.finish_reason or finish
    return ids, finish


def test_block_answers_end_with_stop_only_after_eos(engine):
    # Rounds of 24 seeds until some answer has stopped (the property must be exercised); most
    # answers run their 48 tokens, so how many stop depends on the seeds' random paths.
    stopped = 0
    for first in (0, 24, 48):
        stopped += _check_stops(engine, range(first, first + 24))
        if stopped:
            break
    assert stopped  # the property was exercised


def _check_stops(engine, seeds) -> int:
    """Run block requests with these seeds; every `stop` answer must end where p(EOS) > 1e-3.
    Returns how many stopped."""
    tok = engine.tokenizer
    ctrl = resolve_control({"mode": "block", "num_candidates": 4, "block_size": 4}, engine.config.control,
                           engine.head_names)
    reqs = []
    for seed in seeds:
        q = QUESTIONS[seed % len(QUESTIONS)]
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    tokenize=False), add_special_tokens=False)
        reqs.append(GenerationRequest(f"s{seed}", prompt, SamplingParams(max_tokens=48, temperature=1.0, seed=seed),
                                      ctrl))

    async def main():
        return await asyncio.gather(*(collect(engine, r) for r in reqs))

    results = asyncio.run(main())
    model = engine.core.runner.model
    eos = tok.eos_token_id
    stopped = 0
    for req, (ids, finish) in zip(reqs, results):
        assert finish in ("stop", "length")
        if finish == "length":
            assert len(ids) == 48
            continue
        stopped += 1
        # It stopped, with no stop strings: the base model sampled EOS right after these tokens,
        # so EOS must be a plausible next token there (a mid-sentence cut has p(EOS) ~ 1e-6).
        with torch.no_grad():
            logits = model(torch.tensor([req.prompt_token_ids + ids])).logits[0, -1].float()
        p_eos = float(torch.softmax(logits, -1)[eos])
        assert p_eos > 1e-3, f"seed {req.sampling.seed}: ended with stop after {len(ids)} tokens at p(EOS)={p_eos:.2e}: " \
                             f"{tok.decode(ids)!r}"
    return stopped
