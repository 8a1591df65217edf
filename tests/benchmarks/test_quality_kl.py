"""The KL estimator of the quality benchmark against cases with a known answer."""

from __future__ import annotations

import math
import random

import pytest

from benchmarks.quality.kl import (
    best_of_n_kl,
    best_of_n_kl_bound,
    effective_kl,
    effective_n,
    pool_rank,
    rank_mixture_kl,
    winner_rank,
    winners_kl,
)


def bernoulli_best_of_n_kl(p: float, n: int) -> float:
    """Best-of-n of a 0/1 score with P(1) = p: keeps a 1 with probability 1 - (1 - p)^n."""
    q = 1 - (1 - p) ** n
    return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))


def discrete_best_of_n_kl(values: list[float], probs: list[float], n: int) -> float:
    """Direct sum over the support, from pi_n(v) = F(v)^n - F_(v)^n."""
    order = sorted(range(len(values)), key=values.__getitem__)
    below, kl = 0.0, 0.0
    for i in order:
        sel = (below + probs[i]) ** n - below**n
        kl += sel * math.log(sel / probs[i])
        below += probs[i]
    return kl


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_a_score_without_ties_gives_the_bound(n):
    pool = [0.1 * i for i in range(16)]
    assert best_of_n_kl(pool, n) == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)
    assert best_of_n_kl_bound(n) == pytest.approx(math.log(n) - (n - 1) / n)


def test_identical_answers_cost_nothing():
    assert best_of_n_kl([0.5] * 16, 8) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("ones, n", [(3, 2), (3, 8), (8, 4), (12, 16)])
def test_a_two_valued_score_gives_the_exact_bernoulli_kl(ones, n):
    pool = [0.0] * (16 - ones) + [1.0] * ones
    assert best_of_n_kl(pool, n) == pytest.approx(bernoulli_best_of_n_kl(ones / 16, n), abs=1e-12)
    assert best_of_n_kl(pool, n) < best_of_n_kl_bound(n)


def test_atoms_mixed_with_continuous_values():
    """An atom of mass 1/2 at the bottom, the rest continuous: KL = atom part + integral."""
    n = 4
    pool = [0.0] * 8 + [1.0 + i for i in range(8)]
    atom = 0.5**n * math.log(0.5**n / 0.5)
    # int_{1/2}^1 n u^(n-1) log(n u^(n-1)) du
    f = lambda u: math.log(n) * u**n + (n - 1) * (u**n * math.log(u) - u**n / n)
    assert best_of_n_kl(pool, n) == pytest.approx(atom + f(1.0) - f(0.5), abs=1e-12)


def test_monte_carlo_winners_of_a_continuous_score_give_the_bound():
    rng = random.Random(0)
    n, prompts, m = 4, 3000, 64
    winners, pools = [], []
    for _ in range(prompts):
        winners.append(max(rng.gauss(0, 1) for _ in range(n)))
        pools.append([rng.gauss(0, 1) for _ in range(m)])  # extra base samples, not the candidates
    # the pool's discreteness biases the estimate by O(1/m): 0.01 here
    assert winners_kl(winners, pools, n) == pytest.approx(best_of_n_kl_bound(n), abs=0.04)


def test_monte_carlo_winners_of_a_discrete_score_give_the_exact_kl():
    rng = random.Random(1)
    values, probs, n = [0.0, 0.5, 1.0], [0.5, 0.3, 0.2], 4
    draw = lambda: rng.choices(values, probs)[0]
    winners = [max(draw() for _ in range(n)) for _ in range(4000)]
    pools = [[draw() for _ in range(200)] for _ in range(4000)]
    exact = discrete_best_of_n_kl(values, probs, n)
    assert exact < best_of_n_kl_bound(n) - 0.05  # the bound is off here
    assert winners_kl(winners, pools, n) == pytest.approx(exact, abs=0.03)


def test_winners_that_are_not_the_best_are_caught():
    """Plain samples scored as if they were best-of-4 winners: their KL estimate is far below
    best-of-4's (negative: they sit where best-of-4 rarely lands)."""
    rng = random.Random(2)
    pools = [[rng.random() for _ in range(32)] for _ in range(2000)]
    plain = [rng.random() for _ in range(2000)]
    assert winners_kl(plain, pools, 4) < 0


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_rank_mixture_of_the_best_is_best_of_n(n):
    assert rank_mixture_kl([n] * 10, n) == pytest.approx(best_of_n_kl_bound(n), abs=1e-4)


def test_rank_mixture_known_cases():
    # the worst of 2 has density 2(1 - u): the same KL as the best of 2
    assert rank_mixture_kl([1, 1, 1], 2) == pytest.approx(math.log(2) - 0.5, abs=1e-4)
    # every rank equally often: the kept sample is a plain sample
    assert rank_mixture_kl([1, 2, 3, 4, 5, 6, 7, 8], 8) == pytest.approx(0.0, abs=1e-6)
    # half best, half worst of 2: density 1 everywhere
    assert rank_mixture_kl([1, 2], 2) == pytest.approx(0.0, abs=1e-6)
    # a tie between the two candidates (rank 1.5): as likely best as worst
    assert rank_mixture_kl([1.5], 2) == pytest.approx(0.0, abs=1e-6)


def test_winner_rank_with_ties():
    assert winner_rank([0.1, 0.5, 0.3], 0.5) == 3
    assert winner_rank([0.5, 0.5, 0.1, 0.2], 0.5) == 3.5
    with pytest.raises(ValueError, match="not among its candidates"):
        winner_rank([0.1, 0.2], 0.3)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="n must be a positive integer"):
        best_of_n_kl([0.1], 0)
    with pytest.raises(ValueError, match="at least one per prompt"):
        best_of_n_kl([], 2)
    with pytest.raises(ValueError, match="finite"):
        best_of_n_kl([float("nan")], 2)
    with pytest.raises(ValueError, match="one pool per winner"):
        winners_kl([0.1, 0.2], [[0.1]], 2)
    with pytest.raises(ValueError, match="outside 1..4"):
        rank_mixture_kl([5], 4)


@pytest.mark.parametrize("n", [1, 4, 8])
def test_effective_n_of_best_of_n_winners_is_n(n):
    rng = random.Random(3)
    ranks = []
    for _ in range(3000):
        u = max(rng.random() for _ in range(n))
        ranks.append(pool_rank([rng.random() for _ in range(16)], u))
    assert effective_n(ranks, 16) == pytest.approx(n, rel=0.15)
    assert effective_kl(effective_n(ranks, 16)) == pytest.approx(best_of_n_kl_bound(n), abs=0.1)


def test_pool_rank_counts_ties_as_half():
    assert pool_rank([0.1, 0.5, 0.5, 0.9], 0.5) == 3.0
    assert pool_rank([0.1, 0.2], 0.3) == 3.0
