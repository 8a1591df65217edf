"""The prefix scorer at decode time: one incremental step per generated token for all controlled
rows together, each row with its own KV cache (a row of a left-padded batch cache)."""

from __future__ import annotations

import torch

from cdserve.control.steering import combine_heads, steer_full, steer_top_k, top_k_candidates
from prefix_scorers.kv_cache import KVCache
from prefix_scorers.model import PrefixScorer


class ScorerRunner:
    def __init__(self, scorer: PrefixScorer, device: torch.device):
        self.scorer = scorer
        self.device = device
        self.num_layers = len(scorer.layers)
        self.cache = KVCache.empty(self.num_layers)

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> KVCache:
        """Cache (1 row) of all prompt tokens but the last, as for the base model."""
        cache = KVCache.empty(self.num_layers)
        ids = torch.tensor([prompt[:-1] or prompt[:1]], device=self.device)
        self.scorer(ids, cache=cache)
        if len(prompt) == 1:  # nothing to keep: an empty row
            cache = KVCache([k[:, :, :0] for k in cache.keys], [v[:, :, :0] for v in cache.values],
                            cache.mask[:, :0])
        return cache

    def add_rows(self, cache: KVCache, copies: int) -> None:
        rows = torch.zeros(copies, dtype=torch.long, device=self.device)
        self.cache = self.cache.extend(cache.select(rows) if copies > 1 else cache)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.cache = self.cache.select(rows) if rows.numel() else KVCache.empty(self.num_layers)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Read one token per controlled row. tokens, valid (Bc,) -> queries (Bc, H, d_e) for
        valuing every possible next token."""
        positions = self.cache.mask.sum(1, keepdim=True) if self.cache.length else torch.zeros(
            len(tokens), 1, dtype=torch.long, device=self.device)
        return self.scorer(tokens[:, None], positions=positions, valid=valid[:, None],
                           cache=self.cache).queries[:, -1]

    # -- values ---------------------------------------------------------------------------------
    def values_at(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Raw values (N, H, k) of tokens (N, k)."""
        return self.scorer.values_at(queries, tokens)

    def combine(self, raw: torch.Tensor, gen_positions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Combined normalised value of raw values (N, H, ...) at generated positions (N,)."""
        mean, std = self.scorer.norm_stats(gen_positions)
        return combine_heads(raw, mean, std, weights)

    @torch.inference_mode()
    def final_values(self, prompt: list[int], output: list[int]) -> torch.Tensor:
        """Raw values (H,) of a finished sequence, by one full pass: read at the position before
        the last output token, at that token."""
        ids = torch.tensor([prompt + output[:-1]], device=self.device)
        q = self.scorer(ids).queries[:, -1]  # (1, H, d_e)
        return self.values_at(q, torch.tensor([[output[-1]]], device=self.device))[0, :, 0]


def steer_rows(scorer: PrefixScorer, base: torch.Tensor, queries: torch.Tensor, weights: torch.Tensor,
               strength: torch.Tensor, top_k: list[int], positions: torch.Tensor) -> torch.Tensor:
    """Token mode for N rows (both engines): logits + strength * sum_h w_h Qnorm_h over each
    row's top_k (0: the whole vocabulary). base (N, V); queries (N, H, d_e); weights (N, H);
    strength (N,); top_k on the host (no device sync to split the rows); positions (N,)."""
    dev = base.device
    mean, std = scorer.norm_stats(positions)  # (N, H)
    steered = base.clone()
    full = [j for j, k in enumerate(top_k) if k == 0]
    part = [j for j, k in enumerate(top_k) if k > 0]
    if full:
        f = torch.tensor(full, device=dev)
        combined = scorer.combined_values(queries[f], mean[f], std[f], weights[f])
        steered[f] = steer_full(base[f], combined.to(base.dtype), strength[f])
    if part:
        t = torch.tensor(part, device=dev)
        cands = top_k_candidates(base[t], torch.tensor([top_k[j] for j in part], device=dev))  # (n, k)
        raw = scorer.values_at(queries[t], cands.clamp(min=0))  # (n, H, k)
        combined = combine_heads(raw, mean[t], std[t], weights[t])
        steered[t] = steer_top_k(base[t], cands, combined.to(base.dtype), strength[t])
    return steered
