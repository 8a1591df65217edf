"""The scorer as a ranker on held-out rollouts (prefix_scorers/ranking.py): hand-computed cases and
the values it ranks by (the final values `r2_by_position` scores)."""

from __future__ import annotations

import pytest
import torch

from prefix_scorers.checkpoint import DEFAULT_HEADS, random_scorer
from prefix_scorers.ranking import held_out_ranking, rankable, ranker_share
from prefix_scorers.train import Example, TrainConfig, position_values


def test_share_of_gain_by_hand():
    # prompt a: rewards 0, 1, 2 (mean 1, best 2); the scorer picks the middle one (reward 1)
    # prompt b: rewards 0, 4 (mean 2, best 4); the scorer picks the best
    values = torch.tensor([[0.1], [0.9], [0.5], [0.0], [3.0]])
    rewards = torch.tensor([[0.0], [1.0], [2.0], [0.0], [4.0]])
    out = ranker_share(values, rewards, ["a", "a", "a", "b", "b"])
    assert float(out["picked"][0]) == pytest.approx((1 + 4) / 2)
    assert float(out["best"][0]) == pytest.approx((2 + 4) / 2)
    assert float(out["mean"][0]) == pytest.approx((1 + 2) / 2)
    assert float(out["share_of_gain"][0]) == pytest.approx((2.5 - 1.5) / (3 - 1.5))
    assert int(out["prompts"]) == 2


def test_the_true_reward_ranks_with_share_one_and_its_reverse_below_zero():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(40, 2, generator=g)
    ids = [f"p{i // 4}" for i in range(40)]
    assert ranker_share(rewards, rewards, ids)["share_of_gain"].tolist() == pytest.approx([1.0, 1.0])
    assert (ranker_share(-rewards, rewards, ids)["share_of_gain"] < 0).all()


def test_prompts_with_one_rollout_do_not_count_and_none_at_all_is_an_error():
    values = torch.tensor([[1.0], [0.0], [5.0]])
    rewards = torch.tensor([[0.0], [1.0], [9.0]])
    out = ranker_share(values, rewards, ["a", "a", "single"])
    assert int(out["prompts"]) == 1 and float(out["share_of_gain"][0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="--samples 4"):
        ranker_share(values[:1], rewards[:1], ["a"])


V = 40


def _examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for i, n in enumerate((5, 9, 2, 7, 4, 3)):
        out.append(Example(f"r{i}", f"p{i // 2}", torch.randint(1, V, (3 + n,), generator=g).tolist(), 3,
                           torch.rand(len(DEFAULT_HEADS), generator=g).tolist(), [], [],
                           roll_in=3 if i == 5 else 0))  # r5 is a roll-in / branch: not a plain sample
    return out


def test_held_out_ranking_ranks_the_plain_rollouts_by_their_final_values():
    scorer = random_scorer(V, None, DEFAULT_HEADS, hidden_size=16, num_layers=1).eval()
    ex, cfg = _examples(), TrainConfig(batch_size=4)
    assert rankable(ex) == [0, 1, 2, 3]  # p2 keeps one plain rollout (r5 rolled in): it does not count
    values, rewards = position_values(scorer, ex, cfg, 0)  # {None: the final values}
    got = held_out_ranking(ex, values[None], rewards[None])
    plain_values, plain_rewards = position_values(scorer, ex[:4], cfg, 0)
    want = ranker_share(plain_values[None], plain_rewards[None], ["p0", "p0", "p1", "p1"])
    assert int(got["prompts"]) == 2
    assert torch.allclose(got["share_of_gain"], want["share_of_gain"])
    assert held_out_ranking(ex[4:], values[None][4:], rewards[None][4:]) is None


def test_position_values_come_back_in_the_examples_order():
    # `batches` groups rollouts by length; the values must still line up with the examples (and their
    # prompt ids): each example alone gives the same final value and reward as in the batch
    scorer = random_scorer(V, None, DEFAULT_HEADS, hidden_size=16, num_layers=1).eval()
    ex, cfg = _examples(), TrainConfig(batch_size=4)
    values, rewards = position_values(scorer, ex, cfg, 0)
    for i, e in enumerate(ex):
        one_v, one_r = position_values(scorer, [e], cfg, 0)
        assert torch.allclose(values[None][i], one_v[None][0], atol=1e-5)
        assert torch.equal(rewards[None][i], one_r[None][0])
