"""The KL from the base policy of selection modes, measured from extra base samples.

Best-of-n (keep the highest-scoring of n independent base samples) has, at a score s whose base
CDF is F(s) = P(score <= s) and F_(s) = P(score < s), the selection probability

    pi_n(s) = F(s)^n - F_(s)^n                      (an atom: several answers share the score)
    density ratio n F(s)^(n-1)                      (a continuous score)

(Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy", Lemma 1 and
Theorem 1), so its KL from the base policy is

    KL = E_winner[ log((F^n - F_^n) / (F - F_)) ]   -> continuous: log n + (n - 1) E_winner[log F]
                                                       = log n - (n - 1)/n.

`log n - (n - 1)/n` is what cdserve reports per selection (`control.kl`): an upper bound, reached
when the score has no atoms. It is lower where answers tie (the same text, or a reward that gives
many different texts one value: VADER gives 0 to text without sentiment words). Ties broken at
random (cdserve keeps the first of the tied candidates, which are exchangeable) make the KL over
texts equal to the KL over scores, so the score's distribution is all the estimate needs.

The base distribution per prompt comes from M extra base samples scored the same way. It is
modelled as: a value seen twice or more is an atom with its empirical mass; a value seen once is
continuous mass 1/M spread over its bin of the CDF. With no ties this gives back exactly
log n - (n - 1)/n, with every sample tied it gives 0. Two estimates use that model:

- `best_of_n_kl`: the exact KL of best-of-n under the fitted base distribution (no winners
  needed: what a correct best-of-n has to cost);
- `winners_kl`: the Monte Carlo mean over observed winners of E[log density ratio | winner's
  bin] (the brief's `log N + (N - 1) E_winner[log F]`, tie-aware), which checks that a server's
  winners are distributed as best-of-n's.

For a policy that keeps one of n base samples but not always the best by the final score
(early-pruned best-of-N, whose prunes use partial values), `rank_mixture_kl` takes the ranks it
kept among its own n candidates (the same seeds as the extra samples) and gives the KL of the
kept score's distribution, which by data processing is a lower bound on the KL over texts; the
KL over texts of any keep-one-of-n policy is at most log n (its density ratio is at most n).
Every function here is pure (numbers in, numbers out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Bin:
    """One value of the fitted base distribution: its CDF runs from `lo` to `hi` across it."""

    value: float
    lo: float
    hi: float
    atom: bool  # seen more than once: a point mass (else continuous mass over [lo, hi])


def fit_bins(pool: Sequence[float]) -> list[Bin]:
    """The fitted base distribution of a score from its samples, in increasing order."""
    if not pool:
        raise ValueError("no base samples: the KL estimate needs at least one per prompt")
    if any(not math.isfinite(x) for x in pool):
        raise ValueError(f"base samples must be finite numbers, got {list(pool)}")
    counts: dict[float, int] = {}
    for x in pool:
        counts[float(x)] = counts.get(float(x), 0) + 1
    m, below, bins = len(pool), 0, []
    for value in sorted(counts):
        c = counts[value]
        bins.append(Bin(value, below / m, (below + c) / m, c > 1))
        below += c
    return bins


def _continuous_integral(n: int, a: float, b: float) -> float:
    """int_a^b n u^(n-1) log(n u^(n-1)) du, the best-of-n KL contribution of continuous CDF
    mass from a to b (u^n log u is 0 at u = 0)."""

    def antiderivative(u: float) -> float:
        if u <= 0.0:
            return 0.0
        return math.log(n) * u**n + (n - 1) * (u**n * math.log(u) - u**n / n)

    return antiderivative(b) - antiderivative(a)


def _bin_mass(n: int, b: Bin) -> float:
    return b.hi**n - b.lo**n  # best-of-n's probability of landing in the bin


def _bin_kl(n: int, b: Bin) -> float:
    """The bin's contribution to KL(best-of-n || base)."""
    mass = _bin_mass(n, b)
    if mass <= 0.0:
        return 0.0
    if b.atom:
        return mass * math.log(mass / (b.hi - b.lo))
    return _continuous_integral(n, b.lo, b.hi)


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer (candidates per selection), got {n!r}")


def best_of_n_kl(pool: Sequence[float], n: int) -> float:
    """KL(best-of-n || base) under the base distribution fitted to one prompt's samples."""
    _check_n(n)
    return sum(_bin_kl(n, b) for b in fit_bins(pool))


def best_of_n_kl_bound(n: int) -> float:
    """The bound cdserve reports per selection: the KL for a score without atoms."""
    _check_n(n)
    return math.log(n) - (n - 1) / n


def _locate(bins: list[Bin], score: float) -> Bin:
    for b in bins:
        if b.value == score:
            return b
    raise ValueError(f"winner score {score} is not among the base samples")


def _with(pool: Sequence[float], score: float) -> list[float]:
    """The pool with the winner in it (a winner drawn from other samples joins its pool)."""
    return list(pool) if any(float(x) == float(score) for x in pool) else [*pool, score]


def winner_log_ratio(pool: Sequence[float], score: float, n: int) -> float:
    """E[log(pi_n / pi_base) | the winner's bin]: an atom's exact log ratio, or its mean over a
    continuous bin under best-of-n's density."""
    _check_n(n)
    b = _locate(fit_bins(_with(pool, score)), float(score))
    mass = _bin_mass(n, b)
    if b.atom:
        return math.log(mass / (b.hi - b.lo))
    return _continuous_integral(n, b.lo, b.hi) / mass


def winners_kl(winners: Sequence[float], pools: Sequence[Sequence[float]], n: int) -> float:
    """Monte Carlo KL of best-of-n: the mean over prompts of the winner's log density ratio,
    each prompt's base distribution fitted to its pool."""
    if len(winners) != len(pools) or not winners:
        raise ValueError(f"need one pool per winner, got {len(winners)} winners and {len(pools)} pools")
    return sum(winner_log_ratio(p, w, n) for w, p in zip(winners, pools)) / len(winners)


def winner_rank(candidates: Sequence[float], score: float) -> float:
    """The winner's rank among its n candidates by the ranking score, 1 (worst) to n (best); tied
    candidates share the mean of their ranks."""
    below = sum(1 for x in candidates if x < score)
    tied = sum(1 for x in candidates if x == score)
    if tied == 0:
        raise ValueError(f"winner score {score} is not among its candidates {list(candidates)}")
    return below + (tied + 1) / 2


def rank_mixture_kl(ranks: Sequence[float], n: int, grid: int = 20_000) -> float:
    """KL from the base of a policy that keeps one of n base samples, from the ranks it kept.

    Keeping the sample of rank R (1..n) with probability q_R gives the kept score's CDF value u
    the density g(u) = sum_R q_R f_R(u), f_R the density of the R-th smallest of n uniforms; the
    KL of the kept score is int g log g (midpoint rule on `grid` points). Exact best-of-n
    (q_n = 1) gives log n - (n - 1)/n, a uniform pick 0. For a policy that also looks at other
    things than the final score (early pruning by partial values) this is the KL of the final
    score alone: a lower bound on the KL over texts. A fractional (tied) rank is split between
    the two ranks around it."""
    _check_n(n)
    if not ranks:
        raise ValueError("no ranks: need one winner rank per prompt")
    q = [0.0] * (n + 1)
    for r in ranks:
        if not 1 <= r <= n:
            raise ValueError(f"rank {r} is outside 1..{n}")
        lo = math.floor(r)
        frac = r - lo
        q[lo] += (1 - frac) / len(ranks)
        if frac:
            q[lo + 1] += frac / len(ranks)
    coef = [0] + [n * math.comb(n - 1, k - 1) for k in range(1, n + 1)]  # f_R(u) = coef_R u^(R-1) (1-u)^(n-R)
    total = 0.0
    for i in range(grid):
        u = (i + 0.5) / grid
        g = sum(q[k] * coef[k] * u ** (k - 1) * (1 - u) ** (n - k) for k in range(1, n + 1) if q[k])
        if g > 0:
            total += g * math.log(g)
    return total / grid


def pool_rank(pool: Sequence[float], score: float) -> float:
    """1 + the number of independent base samples below the winner (a tie counts one half)."""
    return 1 + sum(1.0 for x in pool if x < score) + 0.5 * sum(1 for x in pool if x == score)


def effective_n(ranks: Sequence[float], m: int) -> float:
    """Maximum-likelihood a of the best-of-a law (the kept score's CDF value u has density
    a u^(a-1)) from the winners' ranks among m independent base samples each: P(rank = k | a) =
    C(m, k-1) a B(k - 1 + a, m - k + 2). For winners of a policy that does not keep one of its own
    samples' seeds (so `rank_mixture_kl` cannot be used): `effective_kl(a)` is then the KL of the
    kept score under that law, a model-based estimate (exact best-of-N gives a near N)."""
    if not ranks:
        raise ValueError("no ranks: need one winner rank per prompt")
    for r in ranks:
        if not 1 <= r <= m + 1:
            raise ValueError(f"rank {r} is outside 1..{m + 1}")

    def loglik(a: float) -> float:
        total = 0.0
        for r in ranks:
            k = math.floor(r) if r == int(r) else r  # a half rank: the continuous extension
            total += (math.lgamma(m + 1) - math.lgamma(k) - math.lgamma(m - k + 2) + math.log(a)
                      + math.lgamma(k - 1 + a) + math.lgamma(m - k + 2) - math.lgamma(m + 1 + a))
        return total

    lo, hi = math.log(0.05), math.log(512)  # the log-likelihood is unimodal in log a: golden-section search
    g = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if loglik(math.exp(x1)) < loglik(math.exp(x2)):
            lo = x1
        else:
            hi = x2
    return math.exp((lo + hi) / 2)


def effective_kl(a: float) -> float:
    """KL of best-of-a for a continuous score, real a: log a - (a - 1)/a (0 for a <= 1: winners
    no better than a plain sample are not counted as a KL)."""
    return math.log(a) - (a - 1) / a if a > 1 else 0.0
