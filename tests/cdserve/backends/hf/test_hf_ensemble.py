"""The hf engine with an ensemble scorer (3 projections per head): responses report each head's
spread next to its value, and control.risk steers and selects on mean + risk * spread."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from cdserve.backends.hf.engine import HFEngine
from cdserve.config import EngineConfig
from cdserve.control.request import resolve_control
from cdserve.outputs import GenerationRequest
from cdserve.sampling import SamplingParams
from prefix_scorers.base_model import load_model, load_tokenizer
from prefix_scorers.checkpoint import DEFAULT_HEADS, init_from_base, load_scorer, save_scorer
from prefix_scorers.config import EnsembleSpec

_ids = itertools.count()
E = 3


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory, tiny_model_dir):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    scorer = init_from_base(model, tok, DEFAULT_HEADS, num_layers=1, seed=1, base_name="tiny-llama",
                            ensemble=EnsembleSpec(size=E, method="random"))
    with torch.no_grad():  # members far apart: risk visibly changes what is steered to
        scorer.head_proj.mul_(8.0)
    return save_scorer(scorer, tmp_path_factory.mktemp("tiny-ensemble"))


@pytest.fixture(scope="module")
def engine(tiny_model_dir, ensemble_dir):
    eng = HFEngine(EngineConfig(model=str(tiny_model_dir), scorer=str(ensemble_dir), backend="hf",
                                device="cpu", max_batch_rows=32, max_model_len=512, max_tokens_limit=64))
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.shutdown())


def request(engine, text, control, **sampling) -> GenerationRequest:
    ctrl = resolve_control(control, engine.config.control, engine.head_names, engine.rewards.names())
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    return GenerationRequest(f"e{next(_ids)}", ids, SamplingParams(**sampling), ctrl)


def run(engine, req: GenerationRequest) -> dict:
    async def main():
        out = {"ids": [], "control": None}
        async for o in engine.generate(req):
            for d in o.choices:
                out["ids"] += d.token_ids
                out["control"] = d.control or out["control"]
        return out
    return asyncio.run(main())


def test_values_are_ensemble_means_and_spreads_are_reported(engine, ensemble_dir, tiny_model_dir):
    """What a finished choice reports, recomputed from the checkpoint: each head's value is the
    mean of its 3 members at the last token taken, its spread their standard deviation."""
    req = request(engine, "Tell me about cats.", {"mode": "token", "strength": 2.0, "top_k": 5,
                                                 "weights": {"positive": 1.0}, "risk": -0.5},
                  max_tokens=6, temperature=0.0)
    got = run(engine, req)
    model = load_model(tiny_model_dir)
    scorer = load_scorer(ensemble_dir, engine.tokenizer, model.get_input_embeddings().weight)
    ids = torch.tensor([req.prompt_token_ids + got["ids"]])
    members = scorer.score(ids)[0, -2, :, got["ids"][-1]].view(4, E)  # (H, E) at the last token taken
    ctl = got["control"]
    for h, name in enumerate(engine.head_names):
        assert ctl.values[name] == pytest.approx(float(members[h].mean()), abs=1e-4)
        assert ctl.spread[name] == pytest.approx(float(members[h].std()), abs=1e-4)
        assert ctl.spread[name] > 0
    mean, std = scorer.norm_stats(torch.tensor([len(got["ids"]) - 1]))
    adjusted = members[0].mean() - 0.5 * members[0].std()
    assert ctl.combined == pytest.approx(float((adjusted - mean[0, 0]) / std[0, 0]), abs=1e-4)


def test_risk_changes_greedy_token_steering(engine):
    """Greedy and strongly steered, risk -1 and +1 pick different tokens (each head's value moves
    by 2 spreads); risk 0 matches a request that omits it."""
    def ids(risk):
        control = {"mode": "token", "strength": 8.0, "top_k": 10}
        if risk is not None:
            control["risk"] = risk
        return run(engine, request(engine, "Once upon a time", control, max_tokens=12, temperature=0.0))["ids"]
    assert ids(-1.0) != ids(1.0)
    assert ids(0.0) == ids(None)
