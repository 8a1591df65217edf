"""The base model under transformers: prefill one prompt, decode one token for every batch row.

The batch's KV cache is a KVRows (kv_manager.py) that transformers reads and writes through
RowCache: rows share one time axis (left padding) with a validity mask (B, L). Rows join, leave
and fork by row operations on it; no row is ever recomputed, and a step writes one column.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from cdserve.backends.hf.attention import use_grouped_decode_attention
from cdserve.backends.hf.kv_manager import KVRows, RowCache


class ModelRunner:
    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        if model.config._attn_implementation == "sdpa":  # decode without repeat_kv's copy of the cache
            use_grouped_decode_attention(model)
        self.num_layers = model.config.num_hidden_layers
        self.kv = KVRows(self.num_layers)
        self.cache = RowCache(self.kv)

    @property
    def batch_size(self) -> int:
        return self.kv.batch_size

    # -- running the model ----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Keys and values per layer (1, kv_heads, P, head_dim) and mask (1, P) of all prompt tokens
        but the last, which the next decode step reads (so admission and decoding share one path)."""
        ids = torch.tensor([prompt[:-1] or prompt[:1]], device=self.device)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        P = len(prompt) - 1  # a one-token prompt: an empty row (the pass only shaped the tensors)
        keys = [layer.keys[:, :, :P] for layer in cache.layers]
        values = [layer.values[:, :, :P] for layer in cache.layers]
        return keys, values, torch.ones(1, P, dtype=torch.bool, device=self.device)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One step for every row. tokens, valid (B,) -> next-token logits (B, V) float32.
        A row with valid False (waiting for its block's siblings) feeds a placeholder that no
        later token attends to."""
        positions = self.kv.mask.sum(1, keepdim=True)  # (B, 1): real tokens before this one
        mask = self.kv.stage(valid[:, None])  # (B, L+1)
        out = self.model(input_ids=tokens[:, None], attention_mask=mask.long(),
                         position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.kv.commit()
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def unread_last(self, rows: torch.Tensor) -> None:
        """Forget the token the last decode step read for rows (B,) bool: its cache column stops
        counting, so the next step reads the same token again at the same position."""
        self.kv.mask[:, -1] &= ~rows

    # -- row operations (kv_manager.KVRows) -----------------------------------------------------------
    def add_rows(self, prefilled: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor], copies: int) -> None:
        """Append `copies` rows that share one prefilled prompt (the prompt was computed once)."""
        self.kv.add(*prefilled, copies)

    def fork(self, dst: list[int], src: list[int]) -> None:
        self.kv.fork(dst, src)

    def remove(self, rows: list[int]) -> list[int]:
        return self.kv.remove(rows)
