"""Temperature / top-p / seeded sampling, one generator per row so that a seeded row draws the
same tokens whatever else shares its batch."""

from __future__ import annotations

import torch

from cdserve.control.steering import apply_top_p


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           generators: list[torch.Generator | None], all_greedy: bool | None = None,
           truncate: bool | None = None) -> torch.Tensor:
    """logits (N, V) float32; temperature, top_p (N,); one generator per row -> tokens (N,) int64.
    Rows with temperature 0 are greedy; rows whose generator is None draw nothing (their token is
    the argmax and is not used). all_greedy (every row greedy) and truncate (some row has
    top_p < 1) are known on the host from the requests; left None they are read from the device,
    which is a host sync."""
    greedy = temperature == 0
    tokens = logits.argmax(-1)
    if bool(greedy.all()) if all_greedy is None else all_greedy:
        return tokens
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = apply_top_p(logits / t[:, None], top_p, truncate).softmax(-1)
    # Exponential race (argmax p / E, E ~ Exp(1)) is a draw from p. One noise kernel per row:
    # each row draws from its own generator (no host sync; rows are written in place).
    noise = torch.empty_like(probs)
    for row, g in zip(noise, generators):
        if g is None:
            row.fill_(1.0)
        else:
            row.exponential_(generator=g)
    drawn = (probs / noise).argmax(-1)
    return torch.where(greedy, tokens, drawn)
