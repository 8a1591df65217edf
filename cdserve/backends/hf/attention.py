"""Grouped-query decode attention for the base model (transformers' AttentionInterface).

transformers' sdpa path repeats each KV head to its query heads (`repeat_kv`) whenever an
attention mask is passed on the CPU or CUDA, a copy of the whole cache per layer and step (13% of
a CPU decode step for SmolLM2: 3 KV heads -> 9). A decode step has one query per row, so the g
query heads of a KV head can stand in the query-length axis instead: (B, H, 1, d) ->
(B, kv_heads, g, d) against the cache as it is, the row's mask (B, 1, 1, L) broadcast over them.
Prefill (more than one query) keeps transformers' sdpa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "cdserve_grouped_decode"


def grouped_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    B, H, _, d = query.shape
    q = query.view(B, H // groups, groups, d)  # (B, kv_heads, g, d): query head j*g + i reads KV head j
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)  # (B, kv, g, d)
    return out.reshape(B, 1, H, d), None  # (B, q_len 1, H, d), as transformers' attention returns


def use_grouped_decode_attention(model) -> None:
    """Switch model's attention to grouped_decode_attention (its masks: sdpa's)."""
    AttentionInterface.register(NAME, grouped_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
