"""Per-head, position-aware normalisation statistics survive save, export and load."""

from __future__ import annotations

import torch

from prefix_scorers.checkpoint import DEFAULT_HEADS, load_scorer, random_scorer, save_scorer
from prefix_scorers.config import ScorerConfig
from prefix_scorers.export import export_scorer


class _Tok:
    def get_vocab(self):
        return {f"t{i}": i for i in range(50)}

    all_special_tokens = ("t0",)


def test_normalization_round_trip(tmp_path):
    scorer = random_scorer(50, _Tok(), DEFAULT_HEADS, hidden_size=16, num_layers=1)
    torch.manual_seed(1)
    mean, std = torch.randn(4, 7), torch.rand(4, 7) + 0.1
    scorer.norm_mean, scorer.norm_std = mean.clone(), std.clone()
    scorer.config.provenance.trained = True
    save_scorer(scorer, tmp_path / "fp32")
    cfg = ScorerConfig.load(tmp_path / "fp32")
    assert torch.tensor(cfg.normalization.mean).shape == (4, 7)
    export_scorer(tmp_path / "fp32", tmp_path / "bf16")
    for d in ("fp32", "bf16"):
        loaded = load_scorer(tmp_path / d, _Tok())
        assert torch.allclose(loaded.norm_mean, mean) and torch.allclose(loaded.norm_std, std)
        m, s = loaded.norm_stats(torch.tensor([0, 3, 100]))  # 100 clips to the last bucket
        assert torch.allclose(m, mean[:, [0, 3, 6]].T) and torch.allclose(s, std[:, [0, 3, 6]].T)
