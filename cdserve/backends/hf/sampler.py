"""Temperature / top-p / seeded sampling, one generator per row so that a seeded row draws the
same tokens whatever else shares its batch."""

from __future__ import annotations

import torch


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (per row)."""
    if bool((top_p >= 1.0).all()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    drop = before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           generators: list[torch.Generator]) -> torch.Tensor:
    """logits (N, V) float32; temperature, top_p (N,); one generator per row -> tokens (N,) int64.
    Rows with temperature 0 are greedy."""
    greedy = temperature == 0
    tokens = logits.argmax(-1)
    if bool(greedy.all()):
        return tokens
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = apply_top_p(logits / t[:, None], top_p).softmax(-1)
    # Exponential race (argmax p / E, E ~ Exp(1)) is a draw from p; noise comes per row.
    noise = torch.stack([torch.empty(probs.shape[1], device=probs.device).exponential_(generator=g)
                         for g in generators])
    drawn = (probs / noise).argmax(-1)
    return torch.where(greedy, tokens, drawn)
