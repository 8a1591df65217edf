"""The shipped default scorer: trained, small, loads against SmolLM2, and its positive head
prefers a positive continuation to a negative one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefix_scorers.base_model import load_model, load_tokenizer
from prefix_scorers.checkpoint import DEFAULT_HEADS, load_scorer
from prefix_scorers.config import ScorerConfig
from prefix_scorers.rollouts import chat_prompt_ids

DEFAULT = Path(__file__).resolve().parents[2] / "prefix_scorers" / "default"
pytestmark = pytest.mark.skipif(not (DEFAULT / "config.json").is_file(), reason="no default scorer built")


def test_default_scorer_is_small_and_documented():
    cfg = ScorerConfig.load(DEFAULT)
    assert (DEFAULT / "model.safetensors").stat().st_size <= 35_000_000
    assert cfg.head_names == [h.name for h in DEFAULT_HEADS]
    assert cfg.provenance.trained and cfg.provenance.objective in ("fudge", "cdq")
    assert cfg.provenance.data_size > 0 and cfg.provenance.seed is not None
    assert torch.tensor(cfg.normalization.std).shape == (4, 48)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    emb = load_model(smollm2_dir).get_input_embeddings().weight.detach().float()
    return tok, emb


def test_default_scorer_loads_in_float32_and_bfloat16(smol):
    tok, emb = smol
    for dtype in (torch.float32, torch.bfloat16):
        scorer = load_scorer(DEFAULT, tok, emb, dtype=dtype)
        assert scorer.head_proj.dtype == dtype
        ids = torch.tensor([tok.encode("What a lovely day.")])
        assert torch.isfinite(scorer.score(ids).float()).all()


def test_positive_head_prefers_positive_words(smol):
    tok, emb = smol
    scorer = load_scorer(DEFAULT, tok, emb)
    prompt = chat_prompt_ids(tok, "Write a short review of the coffee shop downtown.")
    ids = torch.tensor([prompt + tok.encode("The coffee was")])
    queries = scorer(ids).queries[:, -1]  # (1, H, d_e)
    words = {w: tok.encode(" " + w)[0] for w in ("amazing", "delicious", "terrible", "awful")}
    q = scorer.values_at(queries, torch.tensor([list(words.values())]))[0, 0]  # positive head
    good, bad = q[:2].min(), q[2:].max()
    assert good > bad, dict(zip(words, q.tolist()))


def test_default_normaliser_keeps_each_heads_std_at_half_its_reward_std_or_more():
    """Past the rollouts' last position every rollout is cut at one length, so concise's value had
    almost no spread there (0.22 of its reward std) and steering on it blew up (README, "Reproducing
    the default scorer": export --std-floor 0.5)."""
    cfg = ScorerConfig.load(DEFAULT)
    ratio = [s / r for row, r in zip(cfg.normalization.std, cfg.provenance.reward_std) for s in row]
    assert min(ratio) >= 0.5 - 1e-9
