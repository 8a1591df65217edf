"""Temperature / top-p / seeded sampling, one generator per row so that a seeded row draws the
same tokens whatever else shares its batch."""

from __future__ import annotations

import torch

from cdserve.control.steering import apply_top_p


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
