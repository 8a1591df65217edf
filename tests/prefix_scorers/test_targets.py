"""Value targets (final, mean, soft) pooled over rollouts that share a prefix, and the BCE loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prefix_scorers.targets import prefix_targets, soft_value, value_loss


def test_soft_value_hand_computed():
    # rewards 0 and 1, eta 0.5: 0.5 * log((e^0 + e^2) / 2) = 0.5 * log(4.19453) = 0.71689
    assert soft_value(np.array([[0.0], [1.0]]), 0.5)[0] == pytest.approx(0.5 * math.log((1 + math.e**2) / 2))
    assert soft_value(np.array([[0.0], [1.0]]), 0.5)[0] == pytest.approx(0.716890, abs=1e-6)
    # large eta: the mean; small eta: the max; one sample: itself
    assert soft_value(np.array([[0.0], [1.0]]), 1e4)[0] == pytest.approx(0.5, abs=1e-4)
    assert soft_value(np.array([[0.0], [1.0]]), 1e-3)[0] == pytest.approx(1.0, abs=1e-2)
    assert soft_value(np.array([[0.3]]), 0.1)[0] == pytest.approx(0.3)
    # stable for rewards far above eta
    assert soft_value(np.array([[100.0], [100.0]]), 0.01)[0] == pytest.approx(100.0)


def test_prefix_targets_pool_rollouts_sharing_a_prefix():
    # prompt a: rollouts [1, 2, 3], [1, 2, 4], [1, 5]; prompt b: [1, 2] (same tokens, other prompt)
    prompts = ["a", "a", "a", "b"]
    responses = [[1, 2, 3], [1, 2, 4], [1, 5], [1, 2]]
    rewards = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.9, 0.9]])  # two heads
    final = prefix_targets(prompts, responses, rewards, "final")
    assert [t.tolist() for t in final[2]] == [[0.5, 0.5], [0.5, 0.5]]

    mean = prefix_targets(prompts, responses, rewards, "mean")
    assert mean[0][0].tolist() == pytest.approx([0.5, 0.5])  # [1]: rollouts 0, 1, 2
    assert mean[0][1].tolist() == pytest.approx([0.5, 0.5])  # [1, 2]: rollouts 0, 1
    assert mean[0][2].tolist() == pytest.approx([0.0, 1.0])  # [1, 2, 3]: rollout 0 alone
    assert mean[2][1].tolist() == pytest.approx([0.5, 0.5])  # [1, 5]: rollout 2 alone
    assert mean[3].ravel().tolist() == pytest.approx([0.9] * 4)  # prompt b is its own tree

    eta = np.array([0.5, 0.25])
    soft = prefix_targets(prompts, responses, rewards, "soft", eta)
    # [1] under prompt a, head 0: 0.5 * log((e^0 + e^2 + e^1) / 3)
    assert soft[1][0][0] == pytest.approx(0.5 * math.log((1 + math.e**2 + math.e) / 3))
    # [1, 2], head 1 (eta 0.25): 0.25 * log((e^4 + e^0) / 2)
    assert soft[1][1][1] == pytest.approx(0.25 * math.log((math.e**4 + 1) / 2))
    assert soft[1][2].tolist() == pytest.approx([1.0, 0.0])  # a single rollout: its reward
    with pytest.raises(ValueError, match="eta"):
        prefix_targets(prompts, responses, rewards, "soft")
    with pytest.raises(ValueError, match="target must be one of"):
        prefix_targets(prompts, responses, rewards, "median")


def test_bce_loss_hand_computed_and_minimised_at_the_mean():
    low, high, one = torch.tensor([-1.0]), torch.tensor([1.0]), torch.tensor([1.0])
    # value 0 in [-1, 1] is p = 0.5; target 0.6 is y = 0.8: -(0.8 log 0.5 + 0.2 log 0.5) = log 2
    loss = value_loss(torch.tensor([[0.0]]), torch.tensor([[0.6]]), "bce", low, high, one)
    assert loss.item() == pytest.approx(math.log(2))
    # value 0.5 is p = 0.75; target 0.6 is y = 0.8
    loss = value_loss(torch.tensor([[0.5]]), torch.tensor([[0.6]]), "bce", low, high, one)
    assert loss.item() == pytest.approx(-(0.8 * math.log(0.75) + 0.2 * math.log(0.25)))
    # its minimiser over one value for several targets is their mean (in reward units)
    targets = torch.tensor([[-1.0], [1.0], [1.0], [0.2]])
    v = torch.zeros(1, 1, requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.2)
    for _ in range(500):
        opt.zero_grad()
        value_loss(v.expand(4, 1), targets, "bce", low, high, one).mean().backward()
        opt.step()
    assert v.item() == pytest.approx(targets.mean().item(), abs=1e-3)
    # outside the range: finite, and it pulls back in
    out = torch.tensor([[1.5]], requires_grad=True)
    value_loss(out, torch.tensor([[0.0]]), "bce", low, high, one).sum().backward()
    assert out.grad.item() > 0
    # mse: scaled squared error
    assert value_loss(torch.tensor([[0.5]]), torch.tensor([[0.1]]), "mse", low, high, torch.tensor([4.0])).item() \
        == pytest.approx(0.64)


def test_prefix_targets_pool_a_rollout_only_where_the_base_model_continued_it():
    # rollout 1 forced its first two tokens [1, 2] (a roll-in or a branch: start 2): its reward is a
    # sample of the value of [1, 2, 4] and beyond, not of [1] or [1, 2], so rollout 0's targets there
    # are rollout 0's alone, and rollout 1's own targets before its start are its reward
    prompts = ["a", "a"]
    responses = [[1, 2, 3], [1, 2, 4]]
    rewards = np.array([[0.0], [1.0]])
    mean = prefix_targets(prompts, responses, rewards, "mean", starts=[0, 2])
    assert mean[0].ravel().tolist() == pytest.approx([0.0, 0.0, 0.0])
    assert mean[1].ravel().tolist() == pytest.approx([1.0, 1.0, 1.0])
    # start 1: rollout 1 continued from [1, 2] on, so it joins the group of [1, 2] but not of [1]
    mean = prefix_targets(prompts, responses, rewards, "mean", starts=[0, 1])
    assert mean[0].ravel().tolist() == pytest.approx([0.0, 0.5, 0.0])
    # without starts every position pools (plain rollouts)
    assert prefix_targets(prompts, responses, rewards, "mean")[0].ravel().tolist() == pytest.approx([0.5, 0.5, 0.0])
