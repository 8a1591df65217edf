"""Where a block of block mode ends (`segment`), for both engines.

- fixed: after block_size tokens (the ChoiceController counts).
- sentence: after the first sentence end in the block's text (`SENTENCE_END`; the controller
  reads the text, vLLM stops the candidate with the same characters as stop strings).
- entropy (seed 001; CARDS, arXiv 2406.16306): before the first token, past the block's first,
  that the base model is unsure of: the entropy of its own next-token distribution (temperature 1,
  before top-p and steering) exceeds the request's `entropy_threshold`. The engines compute it
  on their batched logits with `entropy_ends` (hf in its step loop, vLLM in the worker's logits
  processor) and end the candidate (`ChoiceController.end_block`) without taking that token.

block_size is the longest a block may grow in every segmentation.
"""

from __future__ import annotations

import re

import torch

SENTENCE_END = re.compile(r"[.!?\n]")  # segment "sentence": a block ends after the first of these


def next_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per row: (N, V) -> (N,) float32."""
    return torch.special.entr(logits.float().softmax(-1)).sum(-1)


def entropy_ends(logits: torch.Tensor, threshold: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """Segment entropy: which candidates end their block before the token these base logits
    (N, V) would sample. threshold (N,) nats; taken (N,) tokens the candidate already holds this
    block (a block takes at least one token, so a candidate starting at an uncertain token, as every
    block after an entropy end does, goes on). -> (N,) bool, on the logits' device (no host sync)."""
    return (next_token_entropy(logits) > threshold) & (taken >= 1)
