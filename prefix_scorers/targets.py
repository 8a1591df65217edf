"""What each prefix's value is trained toward (`--target`) and with which loss (`--loss`).

Notation: a prompt x has K rollouts y^1..y^K from the base model with final rewards r^k (per
head). The scorer's value Q(x, y_<t, y_t) is read at the token taken; its "prefix" is y_<=t.

Targets for CD-FUDGE (`--objective fudge`), one number per response position and head:

- `final` (CD-FUDGE as published): every prefix of rollout k regresses onto r^k. Its minimiser is
  E[r | x, y_<=t] under the base model, estimated from one rollout per prefix.
- `mean`: the mean of r over the rollouts of the same prompt that share the prefix y_<=t (token
  for token). Same expectation as `final`, less noise where rollouts share their opening tokens.
- `soft`: the soft value of the same group, `eta * log mean_k exp(r^k / eta)` (Q#, Zhou et al.
  2025, arXiv 2502.20548: the value of the KL-regularised optimal policy is the base policy's
  soft value of the reward, `eta * log E[exp(r / eta) | x, y_<=t]`, with eta the KL coefficient).
  eta is per head: `soft_eta * std(r_h)` over the training rollouts, so one flag suits heads of
  any scale. The group is every rollout of the prompt whose response starts with y_<=t, so this
  is the Monte-Carlo plug-in estimate of the soft value wherever K rollouts pass through a
  prefix (mostly the first few tokens), and r^k itself where only rollout k does (a single
  sample's soft value is its reward). Being a log-mean-exp of finitely many samples, it is
  biased low for the true soft value (Jensen), less so the more rollouts share the prefix.

The `dense` target (segment rewards) is added next to these by the segment labeller.

Losses, per position and head, averaged over response tokens:

- `mse`: (Q - target)^2 / var(r_h), summed over heads (the division weighs heads equally).
- `bce`: for a bounded reward, rescale value and target to [0, 1] with the head's reward range,
  p = (Q - lo) / (hi - lo), y = (target - lo) / (hi - lo), and take the cross-entropy
  -(y log p + (1 - y) log(1 - p)) with p clipped to [eps, 1 - eps] (a squared pull back into
  the range where an estimate leaves it). Its minimiser is also p = E[y], the value stays in
  reward units (the server needs no change), and its curvature 1 / (p (1 - p)) weighs errors
  near the ends of the range more, where a squared loss hardly distinguishes 0.98 from 0.9.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

TARGETS = ("final", "mean", "soft")
LOSSES = ("mse", "bce")
BCE_EPS = 1e-3


def soft_value(rewards: np.ndarray, eta: np.ndarray | float) -> np.ndarray:
    """eta * log mean_k exp(r_k / eta) over axis 0 (rewards (K, H), eta (H,) or a scalar), stably."""
    r = np.asarray(rewards, dtype=np.float64)
    m = r.max(0)
    return m + eta * np.log(np.exp((r - m) / eta).mean(0))


def prefix_targets(prompt_ids: Sequence[str], responses: Sequence[Sequence[int]], rewards: np.ndarray,
                   target: str, eta: np.ndarray | None = None,
                   starts: Sequence[int] | None = None) -> list[np.ndarray]:
    """Per rollout i, an (L_i, H) array: the target of the value at each response position.

    prompt_ids (N,), responses (N,) token lists, rewards (N, H). Rollouts are grouped by prompt and
    by shared response prefix (a trie: position t of rollout i is node (prompt, y_<=t)). `starts`
    (N,): rollout i's reward is a sample of the base policy's value only from response position
    starts[i] on (an on-policy roll-in or a branch forced its earlier tokens: `Example.base_from`),
    so it joins a group only there; before it, its targets are its own reward (never trained)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "final":
        return [np.repeat(rewards[i][None], len(y), 0) for i, y in enumerate(responses)]
    if target == "soft" and eta is None:
        raise ValueError("the soft target needs eta (one per head)")
    children: dict[tuple[int, int], int] = {}
    root: dict[str, int] = {}
    members: dict[int, list[int]] = defaultdict(list)
    paths = []
    starts = [0] * len(responses) if starts is None else starts
    for i, (p, y) in enumerate(zip(prompt_ids, responses)):
        node = root.setdefault(p, -1 - len(root))  # negative ids: one root per prompt
        path = []
        for t, tok in enumerate(y):
            node = children.setdefault((node, int(tok)), len(children))
            if t >= starts[i]:
                members[node].append(i)
            path.append(node)
        paths.append(path)
    value = {}
    for node, idx in members.items():
        r = rewards[idx]
        value[node] = r.mean(0) if target == "mean" else soft_value(r, eta)
    return [np.stack([value[n] if t >= starts[i] else rewards[i] for t, n in enumerate(path)]) if path
            else np.zeros((0, rewards.shape[1])) for i, path in enumerate(paths)]


def value_loss(pred: torch.Tensor, target: torch.Tensor, loss: str, low: torch.Tensor, high: torch.Tensor,
               inv_var: torch.Tensor) -> torch.Tensor:
    """Elementwise loss (..., H) of values `pred` against `target` (both in reward units); heads on
    the last axis, with their reward range [low, high] and 1 / var(r) (H,)."""
    if loss == "mse":
        return (pred - target) ** 2 * inv_var
    if loss != "bce":
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    width = high - low
    p = (pred - low) / width
    y = ((target - low) / width).clamp(0, 1)
    pc = p.clamp(BCE_EPS, 1 - BCE_EPS)
    return -(y * pc.log() + (1 - y) * (1 - pc).log()) + (p - pc) ** 2 / BCE_EPS
