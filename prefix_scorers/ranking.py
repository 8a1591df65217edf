"""The scorer as a ranker of finished answers, on held-out rollouts: what cdserve's `best_of_n` does
with it, measured where the data has several base rollouts per prompt.

Per prompt with n >= 2 plain rollouts (no roll-in, no branch), scorer-ranked best-of-n keeps the
rollout with the highest final value (the value after its last token) and true-reward best-of-n
the one with the highest reward. `share_of_gain` = (mean reward of the scorer's picks - mean reward
of all rollouts) / (mean reward of the true picks - mean reward of all rollouts): the quality
benchmark's ranker target (scorer-ranked best-of-8 >= 90% of true-reward best-of-8's gain over
plain decoding), here with n = the run's rollouts per prompt and the mean of all rollouts standing
for plain decoding. Ranked by each head's raw value alone: the server's normalisation divides a
head by a per-position spread, which for one head moves a ranking only between answers of
different lengths (measured on the quality benchmark's samples: the same picks).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch


def per_prompt_picks(values: torch.Tensor, rewards: torch.Tensor,
                     prompt_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """values, rewards (N, H), prompt_ids N -> per prompt with >= 2 rollouts (P, H) each: the reward
    of the scorer's pick, the best reward and the mean reward. Ties pick the first rollout."""
    groups = defaultdict(list)
    for i, p in enumerate(prompt_ids):
        groups[p].append(i)
    rows = [torch.tensor(ix) for ix in groups.values() if len(ix) >= 2]
    if not rows:
        raise ValueError("ranker_share needs prompts with at least 2 rollouts; the run has one per prompt "
                         "(make held-out rollouts with `rollouts --samples 4`)")
    picked = [rewards[ix].gather(0, values[ix].argmax(0, keepdim=True))[0] for ix in rows]
    best = [rewards[ix].max(0).values for ix in rows]
    mean = [rewards[ix].mean(0) for ix in rows]
    return tuple(torch.stack(x).double() for x in (picked, best, mean))


def share_of_gain(picked: torch.Tensor, best: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per-prompt picks (P, H) -> (H,) (mean picked - mean) / (mean best - mean) over the prompts."""
    picked, best, mean = picked.mean(0), best.mean(0), mean.mean(0)
    return (picked - mean) / (best - mean).clamp(min=1e-12)


def ranker_share(values: torch.Tensor, rewards: torch.Tensor, prompt_ids: list[str]) -> dict[str, torch.Tensor]:
    """values, rewards (N, H), prompt_ids N -> per-head (H,) `share_of_gain`, `picked`, `best`, `mean`
    (mean rewards of the scorer's picks, the true picks and all rollouts) over the prompts with >= 2
    rollouts, and `prompts` (their count)."""
    picked, best, mean = per_prompt_picks(values, rewards, prompt_ids)
    return {"share_of_gain": share_of_gain(picked, best, mean), "picked": picked.mean(0), "best": best.mean(0),
            "mean": mean.mean(0), "prompts": torch.tensor(len(picked))}


def rankable(examples) -> list[int]:
    """Indices of the plain rollouts (train.Example with no roll-in: not a branch, not rolled in) of
    the prompts that have at least two of them."""
    counts = Counter(e.prompt_id for e in examples if e.roll_in == 0)
    return [i for i, e in enumerate(examples) if e.roll_in == 0 and counts[e.prompt_id] >= 2]


def held_out_ranking(examples, values: torch.Tensor, rewards: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """`ranker_share` over the rankable rollouts of `examples`, given every example's final values and
    rewards (N, H) in the same order (train.position_values' position None); None when there are none."""
    ix = rankable(examples)
    if not ix:
        return None
    return ranker_share(values[ix], rewards[ix], [examples[i].prompt_id for i in ix])
