"""The KL helpers of token mode and the best-of-N bound, on cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from cdserve.control.steering import best_of_n_kl_bound, kl_divergence


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(3, 11)
    assert torch.allclose(kl_divergence(logits, logits, torch.ones(3)), torch.zeros(3), atol=1e-6)


def test_kl_two_tokens_known_value():
    # p = (3/4, 1/4), q = (1/2, 1/2): KL = 3/4 log(3/2) + 1/4 log(1/2)
    p = torch.log(torch.tensor([[0.75, 0.25]]))
    q = torch.zeros(1, 2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(kl_divergence(p, q, torch.ones(1))) == pytest.approx(expected, rel=1e-5)


def test_kl_is_at_the_sampling_temperature():
    # logits (2 log 3, 0) at temperature 2 give (3/4, 1/4); base (0, 0) gives (1/2, 1/2).
    steered = torch.tensor([[2 * math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(kl_divergence(steered, torch.zeros(1, 2), torch.tensor([2.0]))) == pytest.approx(expected, rel=1e-5)


def test_kl_with_excluded_tokens_and_greedy_rows():
    # Steered keeps only token 0 (top-1, -inf elsewhere): KL = -log q(0). Greedy rows use T = 1.
    base = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    steered = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    assert float(kl_divergence(steered, base, torch.zeros(1))) == pytest.approx(math.log(2), rel=1e-5)


def test_best_of_n_bound():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl_bound(16) == pytest.approx(math.log(16) - 15 / 16)
    assert all(best_of_n_kl_bound(n) < best_of_n_kl_bound(n + 1) for n in range(1, 20))
