"""The base model under transformers: prefill one prompt, decode one token for every batch row.

The batch's KV cache is a transformers DynamicCache whose rows share one time axis (left
padding), plus our own validity mask [B, L]. Rows join, leave and fork by row operations on
the cache tensors; no row is ever recomputed.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from prefix_scorers.kv_cache import cat_rows


class ModelRunner:
    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self.num_layers = model.config.num_hidden_layers
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) bool: which cache columns hold real tokens

    @property
    def batch_size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    # -- building inputs ----------------------------------------------------------------------
    def _layers(self, cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    @staticmethod
    def _set_layers(cache: DynamicCache, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (k, v) in zip(cache.layers, kv):
            layer.keys, layer.values = k, v

    # -- running the model ----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> tuple[DynamicCache, torch.Tensor]:
        """KV cache (1 row) and mask of all prompt tokens but the last, which the next decode step
        reads (so admission and decoding share one path)."""
        ids = torch.tensor([prompt[:-1]], device=self.device)
        cache = DynamicCache(config=self.model.config)
        if ids.shape[1] == 0:  # a one-token prompt: an empty row
            empty = torch.zeros(1, 0, dtype=torch.bool, device=self.device)
            self.model(input_ids=torch.tensor([[prompt[0]]], device=self.device), past_key_values=cache,
                       use_cache=True)
            self._set_layers(cache, [(k[:, :, :0], v[:, :, :0]) for k, v in self._layers(cache)])
            return cache, empty
        self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, torch.ones_like(ids, dtype=torch.bool)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One step for every row. tokens, valid (B,) -> next-token logits (B, V) float32.
        A row with valid False (waiting for its block's siblings) feeds a placeholder that no
        later token attends to."""
        positions = self.mask.sum(1, keepdim=True)  # (B, 1): real tokens before this one
        self.mask = torch.cat([self.mask, valid[:, None]], dim=1)  # (B, L+1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask.long(),
                         position_ids=positions, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def unread_last(self, rows: torch.Tensor) -> None:
        """Forget the token the last decode step read for rows (B,) bool: its cache column stops
        counting, so the next step reads the same token again at the same position."""
        self.mask[:, -1] &= ~rows

    # -- row operations ---------------------------------------------------------------------------
    def add_rows(self, cache: DynamicCache, mask: torch.Tensor, copies: int) -> None:
        """Append `copies` rows that share one prefilled prompt (the prompt was computed once)."""
        kv = [(k.expand(copies, -1, -1, -1), v.expand(copies, -1, -1, -1)) for k, v in self._layers(cache)]
        mask = mask.expand(copies, -1)
        if self.cache is None or self.batch_size == 0:
            self._set_layers(cache, [(k.contiguous(), v.contiguous()) for k, v in kv])
            self.cache, self.mask = cache, mask.contiguous()
            return
        merged = [(cat_rows(a, k, 2), cat_rows(b, v, 2)) for (a, b), (k, v) in zip(self._layers(self.cache), kv)]
        self._set_layers(self.cache, merged)
        self.mask = cat_rows(self.mask, mask, 1)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (or copy) rows: `rows` lists, for each new row, the old row it comes from."""
        if rows.numel() == 0:
            self.cache, self.mask = None, None
            return
        mask = self.mask.index_select(0, rows)
        used = mask.any(0)
        first = int(used.nonzero()[0]) if bool(used.any()) else mask.shape[1]  # drop dead columns
        self.mask = mask[:, first:]
        self._set_layers(self.cache, [(k.index_select(0, rows)[:, :, first:], v.index_select(0, rows)[:, :, first:])
                                      for k, v in self._layers(self.cache)])
