"""The server-side scorer's keys/values of recent prompts, by whole blocks of tokens.

The server process runs the scorer over whole sequences: a finished answer's values (vLLM
backend, every mode) and each block-mode choice's prompt. Requests that share a context (a system
prompt, a long document, the n choices of one request) would each read it again; this cache keeps
the keys/values of the leading whole PREFIX_BLOCK-token blocks of what the scorer read, so a pass
reads only what follows the longest cached prefix. Entries are immutable (the scorer's KVCache
appends by concatenation, never in place), so threads share them without copies; a lock guards
the index. Bounded by tokens, least recently used first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefix_scorers.kv_cache import KVCache

PREFIX_BLOCK = 32  # tokens per block (the vLLM worker's prefix reuse uses the same blocks)


def block_hashes(tokens: Sequence[int]) -> list[int]:
    """Chained hashes of tokens' whole PREFIX_BLOCK-token blocks: entry j-1 names the first j."""
    out, h = [], 0
    for j in range(len(tokens) // PREFIX_BLOCK):
        h = hash((h, tuple(tokens[j * PREFIX_BLOCK:(j + 1) * PREFIX_BLOCK])))
        out.append(h)
    return out


@dataclass(frozen=True)
class _Entry:
    tokens: tuple[int, ...]  # the whole blocks this entry holds
    keys: tuple[torch.Tensor, ...]  # per layer (1, kv_heads, len(tokens), head_dim)
    values: tuple[torch.Tensor, ...]


class ScorerPrefixCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # hash of all its blocks -> entry
        self._index: dict[int, int] = {}  # hash of a first-j-blocks prefix -> key of an entry holding it
        self._tokens = 0
        self._lock = threading.Lock()
        self.hit_tokens = 0  # tokens served from the cache (tests, profiling)

    def __len__(self) -> int:
        return len(self._entries)

    def _holder(self, h: int, tokens: Sequence[int]) -> int | None:
        """Key of an entry holding tokens (whole blocks; h: their hash), marked as used; None if
        none does. Call with the lock held."""
        key = self._index.get(h)
        entry = self._entries.get(key) if key is not None else None
        if entry is None or entry.tokens[:len(tokens)] != tuple(tokens):
            return None
        self._entries.move_to_end(key)
        return key

    def longest(self, tokens: Sequence[int], limit: int) -> tuple[KVCache | None, int]:
        """A fresh one-row cache of the longest cached whole-block prefix of tokens of at most
        `limit` tokens, and its length (None, 0 when nothing is cached)."""
        if self.max_tokens <= 0:
            return None, 0
        hashes = block_hashes(tokens[:limit])
        with self._lock:
            for j in range(len(hashes), 0, -1):
                n = j * PREFIX_BLOCK
                key = self._holder(hashes[j - 1], tokens[:n])
                if key is None:
                    continue
                entry = self._entries[key]
                self.hit_tokens += n
                mask = torch.ones(1, n, dtype=torch.bool, device=entry.keys[0].device)
                return KVCache([k[:, :, :n] for k in entry.keys], [v[:, :, :n] for v in entry.values], mask), n
        return None, 0

    def store(self, tokens: Sequence[int], cache: KVCache) -> None:
        """Keep the keys/values of tokens' whole blocks; cache: one unpadded row holding at least
        those tokens, first token first."""
        hashes = block_hashes(tokens)
        if not hashes or self.max_tokens < len(hashes) * PREFIX_BLOCK:
            return
        n = len(hashes) * PREFIX_BLOCK
        with self._lock:
            if self._holder(hashes[-1], tokens[:n]) is not None:
                return
        entry = _Entry(tuple(tokens[:n]), tuple(k[:, :, :n].clone() for k in cache.keys),
                       tuple(v[:, :, :n].clone() for v in cache.values))
        with self._lock:
            if self._holder(hashes[-1], tokens[:n]) is not None:  # another thread stored it meanwhile
                return
            self._entries[hashes[-1]] = entry
            self._tokens += n
            for h in hashes:
                self._index[h] = hashes[-1]
            while self._tokens > self.max_tokens:
                key, old = self._entries.popitem(last=False)
                self._tokens -= len(old.tokens)
                for h in block_hashes(old.tokens):
                    if self._index.get(h) == key:
                        del self._index[h]
