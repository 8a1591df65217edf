"""The token signal (prefix_scorers/token_signal.py) on cases with known answers, and the
state-value training term (train.batch_loss's state_weight) it motivates."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from prefix_scorers.checkpoint import DEFAULT_HEADS, random_scorer
from prefix_scorers.token_signal import rollout_sums, signal_stats, signal_sums, token_signal
from prefix_scorers.train import (
    Example,
    TrainConfig,
    batch_loss,
    collate,
    state_values,
    taken_values,
)


def _two_step_tree(noise: float):
    """Two binary steps, each token a or b with p = 1/2; r = 1 if the first token is a, else 0
    (the second step does not matter). Every one of the 4 paths once (exact frequencies). The
    exact value: Q(s0, a) = 1, Q(s0, b) = 0; at step 2 both candidates keep the first step's value.
    `noise` adds +noise to candidate a and -noise to b at step 2: spread unrelated to the reward."""
    cand, probs, taken, rewards = [], [], [], []
    for first in (0, 1):
        for second in (0, 1):
            r = 1.0 if first == 0 else 0.0
            step1 = torch.tensor([1.0, 0.0])
            step2 = torch.tensor([r + noise, r - noise])
            cand.append(torch.stack([step1, step2])[:, None, :])  # (T=2, H=1, k=2)
            probs.append(torch.full((2, 2), 0.5))
            taken.append(torch.stack([step1[first], step2[second]])[:, None])  # (T, H)
            rewards.append([r])
    return torch.stack(cand), torch.stack(probs), torch.stack(taken), torch.tensor(rewards)


def test_the_exact_value_has_signal_ratio_one_and_the_reward_s_spread_as_efficiency():
    cand, probs, taken, rewards = _two_step_tree(noise=0.0)
    a, s = rollout_sums(cand, probs, taken, torch.ones(4, 2, dtype=torch.bool))
    assert a[:, 0].tolist() == [0.5, 0.5, -0.5, -0.5]  # r - V(s0), V(s0) = 1/2
    assert s[:, 0].tolist() == [0.25] * 4  # Var at step 1 = 1/4, at step 2 = 0
    stats = signal_stats(a, s, rewards)
    assert float(stats["signal_ratio"][0]) == pytest.approx(1.0)
    assert float(stats["efficiency"][0]) == pytest.approx(0.5)  # std of r: 1/2
    assert float(stats["corr"][0]) == pytest.approx(1.0)


def test_candidate_spread_unrelated_to_the_reward_lowers_ratio_and_efficiency():
    cand, probs, taken, rewards = _two_step_tree(noise=0.5)
    stats = signal_stats(*rollout_sums(cand, probs, taken, torch.ones(4, 2, dtype=torch.bool)), rewards)
    # Cov unchanged (the noise averages out against r), the tilt's variance 1/4 + 1/4
    assert float(stats["cov"][0]) == pytest.approx(0.25)
    assert float(stats["tilt_variance"][0]) == pytest.approx(0.5)
    assert float(stats["signal_ratio"][0]) == pytest.approx(0.5)
    assert float(stats["efficiency"][0]) == pytest.approx(0.25 / math.sqrt(0.5))


def test_masked_positions_do_not_count():
    cand, probs, taken, rewards = _two_step_tree(noise=0.5)
    mask = torch.tensor([[True, False]] * 4)  # the noisy second step left out
    stats = signal_stats(*rollout_sums(cand, probs, taken, mask), rewards)
    assert float(stats["signal_ratio"][0]) == pytest.approx(1.0)


V = 40


def _examples(k: int = 4):
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate((5, 9, 2)):  # responses of different lengths: padding in the batch
        topk = [torch.randperm(V - 1, generator=g)[:k].add(1).tolist() for _ in range(n)]
        lps = [torch.randn(k, generator=g).log_softmax(-1).tolist() for _ in range(n)]
        out.append(Example(f"r{i}", f"p{i}", torch.randint(1, V, (3 + n,), generator=g).tolist(), 3,
                           torch.rand(len(DEFAULT_HEADS), generator=g).tolist(), topk, lps))
    return out


def test_state_values_are_the_probability_weighted_candidate_values_of_each_position():
    scorer = random_scorer(V, None, DEFAULT_HEADS, hidden_size=16, num_layers=1).eval()
    ex = _examples()
    b = collate(ex, 0, "cpu", with_next=False, with_cands=True)
    with torch.no_grad():
        q = scorer(b.input_ids, valid=b.valid).queries
        got = state_values(scorer, q, b)
        # by hand, example 1, response position t = 2 (batch position prompt_len - 1 + t)
        e, t = ex[1], 2
        j = e.prompt_len - 1 + t
        p = torch.tensor(e.topk_logprobs[t]).softmax(-1)
        vals = scorer.values_at(q[1, j][None], torch.tensor([e.topk_ids[t]]))[0]  # (H, k)
    assert torch.allclose(got[1, j], (vals * p).sum(-1), atol=1e-5)
    # the candidates of position j are those y_{t} was drawn from: the taken token's own row
    assert b.cand_ids[1, j].tolist() == e.topk_ids[t]


def test_the_state_term_adds_its_weight_times_the_same_loss_of_the_state_value():
    scorer = random_scorer(V, None, DEFAULT_HEADS, hidden_size=16, num_layers=1).eval()
    b = collate(_examples(), 0, "cpu", with_next=False, with_cands=True)
    inv_var = torch.tensor([1.0, 2.0, 0.5, 1.0])
    with torch.no_grad():
        plain, _ = batch_loss(scorer, b, "fudge", inv_var)
        with_state, _ = batch_loss(scorer, b, "fudge", inv_var, state_weight=0.5)
        q = scorer(b.input_ids, valid=b.valid).queries
        v, taken = state_values(scorer, q, b), taken_values(scorer, q, b.input_ids)
        m = b.taken[..., None].float()
        per = lambda pred: ((((pred - b.rewards[:, None, :]) ** 2) * m).sum((0, 1)) / m.sum((0, 1)) * inv_var).sum()
    assert float(plain) == pytest.approx(float(per(taken)), rel=1e-5)
    assert float(with_state) == pytest.approx(float(per(taken) + 0.5 * per(v)), rel=1e-5)
    with pytest.raises(ValueError, match="needs the candidates"):
        batch_loss(scorer, replace(b, cand_ids=None), "fudge", inv_var, state_weight=1.0)


def test_state_weight_is_checked():
    with pytest.raises(ValueError, match="state_weight must be >= 0"):
        TrainConfig(state_weight=-1)
    with pytest.raises(ValueError, match="CD-FUDGE term"):
        TrainConfig(objective="cdq", state_weight=1)


def test_token_signal_of_a_scorer_runs_over_rollouts_and_matches_the_pure_sums():
    scorer = random_scorer(V, None, DEFAULT_HEADS, hidden_size=16, num_layers=1).eval()
    ex = _examples()
    stats = token_signal(scorer, ex, batch_size=2, pad_id=0)
    assert set(stats) == {"cov", "tilt_variance", "signal_ratio", "efficiency", "corr"}
    assert all(v.shape == (len(DEFAULT_HEADS),) and torch.isfinite(v).all() for v in stats.values())
    assert (stats["tilt_variance"] > 0).all()


def test_signal_sums_come_back_in_the_examples_order():
    """batches() sorts by length; the per-rollout sums must line up with the examples (paired
    comparisons between scorers and bootstraps over prompts rely on it)."""
    scorer = random_scorer(V, None, DEFAULT_HEADS, hidden_size=16, num_layers=1).eval()
    ex = _examples()
    _, _, rewards = signal_sums(scorer, ex, batch_size=2, pad_id=0)
    assert torch.allclose(rewards, torch.tensor([e.rewards for e in ex]))
    one_by_one = torch.cat([signal_sums(scorer, [e], batch_size=1, pad_id=0)[0] for e in ex])
    assert torch.allclose(signal_sums(scorer, ex, batch_size=2, pad_id=0)[0], one_by_one, atol=1e-5)
