"""How much of token mode's tilt is signal: a held-out check of the values token mode compares.

Token mode samples from p(z | s) exp(beta Q(s, z)), so what it acts on is each candidate's advantage
A(s, z) = Q(s, z) - V(s), V(s) = sum_z p(z | s) Q(s, z), not the level of the value (the R^2 of the
final value says nothing about it). Along a base-policy rollout, the advantages of the tokens taken
sum to S_A = sum_t A(s_t, y_t). For the exact value of the base policy this sum telescopes to
r - V(s_0) (a martingale), so

    Cov(S_A, r) = E[sum_t Var_{z ~ p}(Q(s_t, z))] =: S.

For small beta, token mode's KL is about beta^2 S / 2 and its reward gain about beta Cov(S_A, r),
so at a given KL the gain is proportional to `efficiency` = Cov(S_A, r) / sqrt(S): for the exact
value it is sqrt(S), the standard deviation of r - V(s_0) (at most the reward's within-prompt
standard deviation); for a value whose candidate differences are noise, 0. `signal_ratio` =
Cov(S_A, r) / S is the share of the tilt's variance that points towards the reward (1 for the
exact value). The training term that targets it: `train.batch_loss`'s `state_weight`.

Computed over the `store_top_k` candidates recorded with each rollout (renormalised), at the
rollout's sampling temperature; the quality benchmark measures the resulting reward and KL.
"""

from __future__ import annotations

import torch

from prefix_scorers.model import PrefixScorer


def rollout_sums(cand_values: torch.Tensor, cand_probs: torch.Tensor, taken_values: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per rollout, the taken tokens' summed advantage S_A and the summed candidate variance.
    cand_values (N, T, H, k), cand_probs (N, T, k) (rows sum to 1), taken_values (N, T, H),
    mask (N, T) bool: the positions that count -> (N, H) each."""
    p = cand_probs[:, :, None, :].to(cand_values.dtype)
    v = (p * cand_values).sum(-1)  # (N, T, H)
    var = (p * (cand_values - v[..., None]) ** 2).sum(-1)
    m = mask[..., None].to(v.dtype)
    return ((taken_values - v) * m).sum(1), (var * m).sum(1)


def signal_stats(advantage_sums: torch.Tensor, variance_sums: torch.Tensor,
                 rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Over N rollouts: advantage_sums, variance_sums, rewards (N, H) -> per-head (H,) statistics
    (module docstring): cov = Cov(S_A, r), tilt_variance = S, signal_ratio, efficiency, corr."""
    a = advantage_sums.double() - advantage_sums.double().mean(0)
    r = rewards.double() - rewards.double().mean(0)
    cov = (a * r).mean(0)
    s = variance_sums.double().mean(0)
    corr = cov / (a.pow(2).mean(0).sqrt() * r.pow(2).mean(0).sqrt()).clamp(min=1e-12)
    return {"cov": cov, "tilt_variance": s, "signal_ratio": cov / s.clamp(min=1e-12),
            "efficiency": cov / s.clamp(min=1e-12).sqrt(), "corr": corr}


@torch.no_grad()
def signal_sums(scorer: PrefixScorer, examples, batch_size: int, pad_id: int,
                device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rollout_sums of a scorer on rollouts (train.Example, with their stored top-k candidates):
    advantage sums, variance sums and rewards (N, H), in the examples' order."""
    from prefix_scorers.train import batches, candidate_values, collate, taken_values

    sums_a, sums_s, rewards = [], [], []
    groups = batches(examples, batch_size, 0, shuffle=False)  # sorted by length: the order is restored below
    for group in groups:
        b = collate(group, pad_id, device, with_next=False, with_cands=True)
        queries = scorer(b.input_ids, valid=b.valid).queries
        cand = scorer.head_values(candidate_values(scorer, queries, b), dim=2)  # (B, T-1, H, k)
        taken = scorer.head_values(taken_values(scorer, queries, b.input_ids), dim=-1)  # (B, T-1, H)
        a, s = rollout_sums(cand.float(), b.cand_probs, taken.float(), b.taken)
        sums_a.append(a.cpu()), sums_s.append(s.cpu()), rewards.append(b.rewards.cpu())
    order = {id(e): i for i, e in enumerate(examples)}
    ranked = [order[id(e)] for group in groups for e in group]
    inverse = torch.empty(len(ranked), dtype=torch.long)
    inverse[torch.tensor(ranked)] = torch.arange(len(ranked))
    return tuple(torch.cat(x)[inverse] for x in (sums_a, sums_s, rewards))


def token_signal(scorer: PrefixScorer, examples, batch_size: int, pad_id: int,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    """signal_stats of a scorer on rollouts (train.Example, with their stored top-k candidates)."""
    return signal_stats(*signal_sums(scorer, examples, batch_size, pad_id, device))
