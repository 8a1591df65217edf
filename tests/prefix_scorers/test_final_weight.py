"""`final_weight`: the training loss's share on the finished answer's value (what best-of-N and block
selection rank by), the rest the mean over every prefix."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from prefix_scorers.checkpoint import DEFAULT_HEADS, random_scorer
from prefix_scorers.train import Example, TrainConfig, batch_loss, collate

V = 40


def _batch():
    g = torch.Generator().manual_seed(0)
    examples = [Example(f"r{i}", "p", torch.randint(1, V, (3 + n,), generator=g).tolist(), 3,
                        torch.rand(len(DEFAULT_HEADS), generator=g).tolist(), [], [])
                for i, n in enumerate((5, 9, 2))]  # responses of different lengths: padding in the batch
    return collate(examples, 0, "cpu", with_next=False)


def test_the_loss_is_a_mix_of_the_mean_over_prefixes_and_the_mean_over_finished_answers():
    scorer = random_scorer(V, None, DEFAULT_HEADS, hidden_size=16, num_layers=1).eval()
    batch, inv_var = _batch(), torch.tensor([1.0, 2.0, 0.5, 1.0])
    with torch.no_grad():
        every, every_h = batch_loss(scorer, batch, "fudge", inv_var)
        last, last_h = batch_loss(scorer, replace(batch, taken=batch.taken & batch.last), "fudge", inv_var)
        for w in (0.25, 0.9):
            mixed, mixed_h = batch_loss(scorer, batch, "fudge", inv_var, final_weight=w)
            assert float(mixed) == pytest.approx((1 - w) * float(every) + w * float(last), rel=1e-5)
            assert torch.allclose(mixed_h, (1 - w) * every_h + w * last_h, rtol=1e-5)
        assert float(batch_loss(scorer, batch, "fudge", inv_var, final_weight=0.0)[0]) == float(every)
    assert float(last) != pytest.approx(float(every))  # the two means differ: the mix is not vacuous


def test_final_weight_is_checked():
    with pytest.raises(ValueError, match=r"final_weight must be in \[0, 1\)"):
        TrainConfig(final_weight=1.0)
