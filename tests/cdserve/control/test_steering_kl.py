"""control.kl's per-token term (steering.sampled_kl) and the best-of-N bound, on cases with known
answers: KL(what the sampler draws from || the base model at the request's temperature)."""

from __future__ import annotations

import math

import pytest
import torch

from cdserve.control.steering import (
    best_of_n_kl_bound,
    sampled_kl,
    steer_top_k,
    steer_top_k_values,
    top_k_candidates,
    top_k_kl,
)

ONE = torch.ones(1)


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(3, 11)
    assert torch.allclose(sampled_kl(logits, logits, torch.ones(3), torch.ones(3)), torch.zeros(3), atol=1e-6)


def test_kl_two_tokens_known_value():
    # p = (3/4, 1/4), q = (1/2, 1/2): KL = 3/4 log(3/2) + 1/4 log(1/2)
    p = torch.log(torch.tensor([[0.75, 0.25]]))
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(sampled_kl(p, torch.zeros(1, 2), ONE, ONE)) == pytest.approx(expected, rel=1e-5)


def test_kl_is_at_the_sampling_temperature():
    # logits (2 log 3, 0) at temperature 2 give (3/4, 1/4); base (0, 0) gives (1/2, 1/2).
    steered = torch.tensor([[2 * math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(sampled_kl(steered, torch.zeros(1, 2), torch.tensor([2.0]), ONE)) == pytest.approx(expected, rel=1e-5)


def test_kl_with_excluded_tokens():
    # Steered keeps only token 0 (top-1, -inf elsewhere): KL = -log q(0).
    base = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    steered = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    assert float(sampled_kl(steered, base, ONE, ONE)) == pytest.approx(math.log(2), rel=1e-5)


def test_top_p_truncation_counts():
    # Unsteered, top_p 0.05 keeps the top token only: KL = -log q(0) = log 2, not 0.
    base = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert float(sampled_kl(base, base, ONE, torch.tensor([0.05]))) == pytest.approx(math.log(2), rel=1e-5)
    # top_p 0.7 keeps (0.5, 0.3) renormalised: KL = -log(0.8).
    assert float(sampled_kl(base, base, ONE, torch.tensor([0.7]))) == pytest.approx(-math.log(0.8), rel=1e-5)
    # Steered (0.2, 0.3, 0.5) with top_p 0.6 keeps tokens 2, 1 (5/8, 3/8) against q:
    steered = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    expected = 5 / 8 * math.log((5 / 8) / 0.2) + 3 / 8 * math.log((3 / 8) / 0.3)
    assert float(sampled_kl(steered, base, ONE, torch.tensor([0.6]))) == pytest.approx(expected, rel=1e-5)


def test_greedy_rows_compare_point_masses():
    base = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    steered = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1]]))
    kl = sampled_kl(steered, base, torch.zeros(2), torch.ones(2))
    assert float(kl[0]) == 0.0  # same greedy token: the same point mass
    assert math.isinf(float(kl[1]))  # another token: infinite, reported as such


def test_best_of_n_bound():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl_bound(16) == pytest.approx(math.log(16) - 15 / 16)
    assert all(best_of_n_kl_bound(n) < best_of_n_kl_bound(n + 1) for n in range(1, 20))


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_top_k_kl_equals_the_whole_vocabulary_kl(top_p):
    """The vLLM processor's KL from the k candidates alone (one pass over the vocabulary) is
    sampled_kl of the (N, V) steered rows: sampled rows, greedy rows whose steered argmax stays or
    moves, a tie between two candidates, unused ranks (top_k below k_max), top-p truncation."""
    g = torch.Generator().manual_seed(0)
    N, V = 6, 50
    base = torch.randn(N, V, generator=g) * 3
    top_k = torch.tensor([5, 3, 5, 1, 4, 5])
    cands = top_k_candidates(base, top_k, 5)
    combined = torch.randn(N, 5, generator=g)
    combined[2] = 0.0
    base[2, cands[2, 1]] = base[2, cands[2, 0]]  # row 2: a tie between its two best candidates
    cands = top_k_candidates(base, top_k, 5)
    strength = torch.tensor([2.0, 0.5, 0.0, 1.0, 4.0, 2.0])
    temperature = torch.tensor([0.7, 1.0, 0.0, 0.0, 0.0, 1.3])
    top_p_t = torch.full((N,), top_p)
    full = sampled_kl(steer_top_k(base, cands, combined, strength), base, temperature, top_p_t)
    _, steered = steer_top_k_values(base, cands, combined, strength)
    fast = top_k_kl(steered, cands, base, temperature, top_p_t)
    assert torch.isinf(full[2:5]).tolist() == torch.isinf(fast[2:5]).tolist()
    assert torch.isinf(full).any() and not torch.isinf(full).all()  # both greedy cases occur
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    hinted = top_k_kl(steered, cands, base, temperature, top_p_t, truncate=top_p < 1, any_greedy=True)
    torch.testing.assert_close(hinted, full, rtol=1e-5, atol=1e-6)
