"""export --std-floor: a checkpoint renormalised without its training data (the normaliser's std
raised to a share of each head's reward std, never lowered), weights and loss plot kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefix_scorers.config import ScorerConfig
from prefix_scorers.export import export_scorer, floored

DEFAULT = Path(__file__).resolve().parents[2] / "prefix_scorers" / "default"
pytestmark = pytest.mark.skipif(not (DEFAULT / "config.json").is_file(), reason="no default scorer built")


def test_floor_raises_each_heads_std_to_a_share_of_its_reward_std_and_never_lowers_it():
    cfg = ScorerConfig.load(DEFAULT)
    reward_std = torch.tensor(cfg.provenance.reward_std)[:, None]
    before = torch.tensor(cfg.normalization.std)
    after = torch.tensor(floored(cfg, 0.5).normalization.std)
    assert torch.equal(after, torch.maximum(before, 0.5 * reward_std))
    assert torch.equal(torch.tensor(floored(cfg, 0.0).normalization.std), before)
    assert floored(cfg, 0.5).provenance.norm_std_floor == 0.5
    assert floored(cfg, 0.5).normalization.mean == cfg.normalization.mean


def test_floor_needs_the_reward_std_that_training_records():
    cfg = ScorerConfig.load(DEFAULT)
    cfg.provenance = cfg.provenance.model_copy(update={"reward_std": None})
    with pytest.raises(ValueError, match="provenance.reward_std"):
        floored(cfg, 0.5)
    with pytest.raises(ValueError, match="must be >= 0"):
        floored(ScorerConfig.load(DEFAULT), -1.0)


def test_re_export_keeps_the_weights_and_the_loss_plot(tmp_path):
    out = export_scorer(DEFAULT, tmp_path / "floored", std_floor=0.6)
    new, old = load_file(out / "model.safetensors"), load_file(DEFAULT / "model.safetensors")
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old)
    assert (out / "loss.png").read_bytes() == (DEFAULT / "loss.png").read_bytes()
    cfg = ScorerConfig.load(out)
    assert min(s / r for row, r in zip(cfg.normalization.std, cfg.provenance.reward_std) for s in row) >= 0.6
