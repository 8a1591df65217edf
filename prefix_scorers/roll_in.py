"""On-policy rounds (issue 14): roll in with the steered policy, roll out with the base policy.

A scorer trained on base-policy rollouts sees, at decode time, prefixes of the steered policy
that its training data rarely holds. An on-policy round adds rollouts whose prefix comes from the
steered policy, while the value targets stay those of the base policy (the value controlled
decoding needs is E_base[r | prefix]):

- roll in: response tokens 0 .. t-1 are sampled from token-mode steering with a previous scorer,
      pi(z | x, y_<i) proportional to p(z | x, y_<i) exp(strength * sum_h w_h Qnorm_h(x, y_<i, z))
  over the base model's top-k tokens (k 0: the whole vocabulary), Qnorm_h = (Q_h - mean_h(i)) /
  std_h(i) with the scorer's position statistics: cdserve's token mode (its `steer_rows`), here
  computed with `PrefixScorer.combined_values` (this package does not import cdserve), then the
  temperature. With the whole vocabulary the steered logits are logits + strength * combined.
- roll out: tokens t .. end are sampled from the base model, unchanged.

The switch point t is drawn per rollout, uniform over 0 .. max_new_tokens - 1 (seeded by the
run's seed and the rollout's id: a resumed run draws the same), and stored as `roll_in` with the
rollout. Every token after position t - 1 is a base sample, so the final reward is an unbiased
sample of the base value of the prefixes y_<=j for j >= t - 1, and only of those: training
(train.py `collate`) regresses the values of response positions j >= min(t, L) - 1 only (L the
response length; the whole response's value is its reward whatever the policy). t = 0 is a plain
rollout.

Sampling goes through transformers' `generate` as plain rollouts do, with this steering as a
logits processor that also applies the temperature (generate runs at temperature 1, top-p 1, so
its own warpers do nothing after it); the scorer reads the batch incrementally (its KV cache,
left-padded prompts) while any row is still rolling in. With strength 0 and top_k 0 the steered
logits are the base logits and the rollouts are the plain ones, token for token (tested).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from prefix_scorers.kv_cache import KVCache


@dataclass(frozen=True)
class RollIn:
    """Roll-in settings: the previous scorer, its head weights, strength and top-k."""

    scorer_dir: str
    weights: dict[str, float] = field(default_factory=lambda: {"positive": 1.0})
    strength: float = 2.0
    top_k: int = 20  # cdserve's default until it became 100 (benchmarks/RESULTS.md); 0: the whole vocabulary

    def __post_init__(self):
        if not self.weights or not any(self.weights.values()):
            raise ValueError(f"roll-in weights must give some head a non-zero weight, got {self.weights}")
        if self.strength < 0 or self.top_k < 0:
            raise ValueError(f"roll-in strength and top_k must be >= 0, got {self.strength} and {self.top_k}")


def parse_weights(items: list[str] | None) -> dict[str, float]:
    """`--roll-in-weights positive=1 concise=0.5` -> {"positive": 1.0, "concise": 0.5}."""
    out = {}
    for item in items or ["positive=1"]:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"roll-in weight {item!r} is not head=number (e.g. positive=1)")
    return out


def switch_point(seed: int, rollout_id: str, max_new_tokens: int) -> int:
    """The rollout's switch point t, uniform over 0 .. max_new_tokens - 1, fixed by (seed, id)."""
    return random.Random(f"roll-in:{seed}:{rollout_id}").randrange(max_new_tokens)


def load_roll_in_scorer(roll_in: RollIn, tokenizer, model, device: str):
    """The previous scorer and its weight vector (H,) in its head order."""
    from prefix_scorers.checkpoint import load_scorer

    scorer = load_scorer(roll_in.scorer_dir, tokenizer, model.get_input_embeddings().weight.detach().float(),
                         device=device).eval()
    unknown = sorted(set(roll_in.weights) - set(scorer.config.head_names))
    if unknown:
        raise ValueError(f"roll-in weights name heads {unknown} that scorer {roll_in.scorer_dir} does not have "
                         f"(its heads: {scorer.config.head_names})")
    w = torch.tensor([roll_in.weights.get(h, 0.0) for h in scorer.config.head_names], device=device)
    return scorer, w


class RollInSteering:
    """A transformers logits processor: token-mode steering for rows still rolling in (response
    position < their switch point), the temperature for every row."""

    def __init__(self, scorer, weights: torch.Tensor, roll_in: RollIn, temperature: float,
                 prompt_valid: torch.Tensor, switch: torch.Tensor):
        self.scorer, self.w, self.roll_in, self.temperature = scorer, weights, roll_in, temperature
        self.prompt_valid = prompt_valid  # (B, W) bool: the left-padded prompts' real tokens
        self.switch = switch  # (B,) long
        self.cache: KVCache | None = None
        self.done = False  # every row has rolled out: the scorer is no longer read

    @torch.inference_mode()
    def _queries(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The scorer's queries (B, H*E, d_e) after the last token of input_ids, incrementally."""
        if self.cache is None:
            self.cache = KVCache.empty(len(self.scorer.layers))
            valid = self.prompt_valid
            positions = (valid.long().cumsum(1) - 1).clamp(min=0)
            return self.scorer(input_ids, positions=positions, valid=valid, cache=self.cache).queries[:, -1]
        positions = self.cache.mask.sum(1, keepdim=True)
        valid = torch.ones_like(input_ids[:, -1:], dtype=torch.bool)
        return self.scorer(input_ids[:, -1:], positions=positions, valid=valid, cache=self.cache).queries[:, -1]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = input_ids.shape[1] - self.prompt_valid.shape[1]  # response index of the token to sample
        steer = self.switch > position  # (B,)
        if self.done or not bool(steer.any()):
            self.done = True
            return scores / self.temperature
        q = self._queries(input_ids)
        B = scores.shape[0]
        mean, std = self.scorer.norm_stats(torch.full((B,), position, device=scores.device))
        combined = self.scorer.combined_values(q, mean, std, self.w.expand(B, -1)).to(scores.dtype)  # (B, V)
        steered = scores + self.roll_in.strength * combined
        if 0 < self.roll_in.top_k < scores.shape[-1]:  # a top_k over the vocabulary keeps every token
            keep = scores.topk(self.roll_in.top_k, dim=-1).indices
            steered = torch.full_like(scores, float("-inf")).scatter(1, keep, steered.gather(1, keep))
        return torch.where(steer[:, None], steered, scores) / self.temperature
