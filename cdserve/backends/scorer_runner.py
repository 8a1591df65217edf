"""The prefix scorer at decode time: one incremental step per generated token for all controlled
rows together, each row with its own KV cache (a row of a left-padded batch cache)."""

from __future__ import annotations

import torch

from cdserve.backends.hf.kv_manager import KVRows, ScorerKV
from cdserve.backends.scorer_prefix_cache import ScorerPrefixCache
from cdserve.control.steering import combine_heads, ensemble_stats, risk_adjusted
from prefix_scorers.kv_cache import KVCache
from prefix_scorers.model import PrefixScorer


class ScorerRunner:
    def __init__(self, scorer: PrefixScorer, device: torch.device, prefix_cache_tokens: int = 0):
        self.scorer = scorer
        self.device = device
        self.num_layers = len(scorer.layers)
        self.kv = KVRows(self.num_layers)  # the controlled rows' cache, in the engine's controlled-row order
        self.cache = ScorerKV(self.kv)
        # whole-sequence passes (prefill, final_values) start from the longest cached prompt prefix
        self.prefixes = ScorerPrefixCache(prefix_cache_tokens)
        self.read_tokens = 0  # tokens whole-sequence passes read (tests, profiling)

    @property
    def batch_size(self) -> int:
        return self.kv.batch_size

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> KVCache:
        """Cache (1 row) of all prompt tokens but the last, as for the base model."""
        if len(prompt) == 1:  # nothing to keep: an empty row
            cache = KVCache.empty(self.num_layers)
            self.scorer(torch.tensor([prompt], device=self.device), cache=cache)
            return KVCache([k[:, :, :0] for k in cache.keys], [v[:, :, :0] for v in cache.values],
                           cache.mask[:, :0])
        seq = prompt[:-1]
        cache, n = self.prefixes.longest(seq, len(seq))
        if n < len(seq):
            cache, _ = self._read(seq, cache, n)
        self.prefixes.store(seq, cache)
        return cache

    def _read(self, seq: list[int], cache: KVCache | None, n: int) -> tuple[KVCache, torch.Tensor]:
        """Read seq[n:] after cache (seq's first n tokens' keys/values, or None for n = 0): the
        cache of all of seq and the queries (1, 1, H*E, d_e) at its last token (the only ones any
        whole-sequence pass uses: the head projections are skipped at the others)."""
        cache = cache if cache is not None else KVCache.empty(self.num_layers)
        ids = torch.tensor([seq[n:]], device=self.device)
        positions = torch.arange(n, len(seq), device=self.device)[None]
        queries = self.scorer(ids, positions=positions, cache=cache, last_only=True).queries
        self.read_tokens += len(seq) - n
        return cache, queries

    # -- row operations (kv_manager.KVRows, as the base model's) -------------------------------------
    def add_rows(self, cache: KVCache, copies: int) -> None:
        self.kv.add(cache.keys, cache.values, cache.mask, copies)

    def fork(self, dst: list[int], src: list[int]) -> None:
        self.kv.fork(dst, src)

    def remove(self, rows: list[int]) -> list[int]:
        return self.kv.remove(rows)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Read one token per controlled row. tokens, valid (Bc,) -> queries (Bc, H*E, d_e) for
        valuing every possible next token (E: the scorer's ensemble size)."""
        positions = self.kv.mask.sum(1, keepdim=True)  # (Bc, 1)
        queries = self.scorer(tokens[:, None], positions=positions, valid=valid[:, None],
                              cache=self.cache).queries[:, -1]
        self.kv.commit()
        return queries

    @torch.inference_mode()
    def unread_last(self, rows: torch.Tensor) -> None:
        """Forget the token the last step read for rows (Bc,) bool (as ModelRunner.unread_last)."""
        if rows.numel() and self.kv.length:
            self.kv.mask[:, -1] &= ~rows

    # -- values ---------------------------------------------------------------------------------
    def values_at(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Raw member values (N, H*E, k) of tokens (N, k)."""
        return self.scorer.values_at(queries, tokens)

    def combine(self, raw: torch.Tensor, gen_positions: torch.Tensor, weights: torch.Tensor,
                risk: torch.Tensor | None = None) -> torch.Tensor:
        """Combined normalised value of raw member values (N, H*E, ...) at generated positions (N,),
        each head valued at mean + risk * spread (risk (N,); None: 0)."""
        mean, std = self.scorer.norm_stats(gen_positions)
        risk = torch.zeros(len(raw), device=raw.device) if risk is None else risk
        return combine_heads(risk_adjusted(raw, self.scorer.ensemble_size, risk), mean, std, weights)

    def head_values(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a response reports per head: value (the ensemble mean) and spread (N, H) of raw
        member values (N, H*E); spread None for a scorer without an ensemble."""
        values, spread = ensemble_stats(raw, self.scorer.ensemble_size)
        return values, spread if self.scorer.ensemble_size > 1 else None

    @torch.inference_mode()
    def final_values(self, prompt: list[int], output: list[int]) -> torch.Tensor:
        """Raw member values (H*E,) of a finished sequence, by one pass after the longest cached
        prompt prefix: read at the position before the last output token, at that token."""
        seq = prompt + output[:-1]
        cache, n = self.prefixes.longest(seq, len(seq) - 1)  # the last token is read: its query
        cache, queries = self._read(seq, cache, n)
        q = queries[:, -1]  # (1, H*E, d_e)
        self.prefixes.store(prompt, cache)  # the prompt's blocks: other choices and requests share them
        return self.values_at(q, torch.tensor([[output[-1]]], device=self.device))[0, :, 0]

