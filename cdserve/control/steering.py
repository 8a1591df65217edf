"""Token-mode steering and candidate selection: small pure functions on tensors.

Token mode: logits'(z) = logits(z) + strength * sum_h w_h Qnorm_h(z) over the top-k tokens,
-inf elsewhere. Sampling from softmax(logits') is sampling from p(z) exp(strength * Q(z))
restricted to the top-k, the KL-regularised optimum of the controlled-decoding paper.
"""

from __future__ import annotations

import math

import torch


def top_k_candidates(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Candidate ids (N, k_max) of each row's top tokens; rows asking for fewer than k_max get
    their extra ranks set to -1. logits (N, V), top_k (N,) >= 1."""
    k_max = int(top_k.max())
    ids = logits.topk(k_max, dim=-1).indices  # (N, k_max)
    ranks = torch.arange(k_max, device=logits.device)[None]
    return ids.masked_fill(ranks >= top_k[:, None], -1)


def combine_heads(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """Combined value sum_h w_h (Q_h - mean_h) / std_h.
    values (N, H, ...), mean/std/weights (N, H) -> (N, ...)."""
    extra = values.dim() - 2
    shape = weights.shape + (1,) * extra
    return ((values - mean.view(shape)) / std.view(shape) * weights.view(shape)).sum(1)


def steer_top_k(logits: torch.Tensor, candidates: torch.Tensor, combined: torch.Tensor,
                strength: torch.Tensor) -> torch.Tensor:
    """logits (N, V); candidates (N, k) with -1 for unused ranks; combined (N, k) values of the
    candidates; strength (N,). Returns steered logits, -inf outside the candidates."""
    valid = candidates >= 0
    # Unused ranks repeat rank 0 (always valid), so duplicate scatter writes agree.
    ids = torch.where(valid, candidates, candidates[:, :1])
    steered = logits.gather(1, ids) + strength[:, None] * combined
    steered = torch.where(valid, steered, steered[:, :1])
    return torch.full_like(logits, float("-inf")).scatter_(1, ids, steered)


def steer_full(logits: torch.Tensor, combined: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """top_k 0: every token. logits, combined (N, V); strength (N,)."""
    return logits + strength[:, None] * combined


def kl_divergence(steered: torch.Tensor, base: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """KL(steered || base) per row between the distributions actually sampled from, at each row's
    temperature (greedy rows use 1). steered, base (N, V) logits -> (N,)."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]
    log_p = torch.log_softmax(steered.float() / t, dim=-1)
    log_q = torch.log_softmax(base.float() / t, dim=-1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def best_of_n_kl_bound(n: int) -> float:
    """The paper's bound on KL(best-of-n || base) for one selection among n: log n - (n-1)/n."""
    return math.log(n) - (n - 1) / n


def select_candidate(combined: torch.Tensor, selection: str, strength: float,
                     generator: torch.Generator | None = None) -> int:
    """Pick one of K candidates by their combined values (K,): the argmax, or a sample from
    softmax(strength * value)."""
    if selection == "argmax" or combined.numel() == 1:
        return int(combined.argmax())
    probs = torch.softmax(strength * combined.double(), dim=0)
    return int(torch.multinomial(probs, 1, generator=generator))
