"""Left-padded batch KV tensors: the row operations continuous batching needs.

Every row of a batch shares one time axis; a row that is shorter is padded on the left, and a
boolean mask says which columns hold real tokens. Rows join (concat), leave (select) and fork
(select with repeated indices) without touching the other rows' values.
"""

from __future__ import annotations

import torch


def left_pad(t: torch.Tensor, length: int, dim: int, value: float = 0.0) -> torch.Tensor:
    """Pad `t` on the left of `dim` up to `length`."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_full(shape, value), t], dim=dim)


def cat_rows(a: torch.Tensor | None, b: torch.Tensor, time_dim: int) -> torch.Tensor:
    """Stack the rows of `b` under those of `a`, left-padding the shorter along `time_dim`."""
    if a is None or a.shape[0] == 0:
        return b
    length = max(a.shape[time_dim], b.shape[time_dim])
    return torch.cat([left_pad(a, length, time_dim), left_pad(b, length, time_dim)], dim=0)


class KVCache:
    """Per-layer keys/values [B, kv_heads, L, head_dim] plus the validity mask [B, L]."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor):
        self.keys, self.values, self.mask = keys, values, mask

    @classmethod
    def empty(cls, num_layers: int) -> KVCache:
        return cls([None] * num_layers, [None] * num_layers, None)  # type: ignore[list-item]

    @property
    def batch_size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new time steps for one layer; returns the full keys/values."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def select(self, rows: torch.Tensor) -> KVCache:
        """Keep (or repeat) rows, then drop leading columns no remaining row uses."""
        mask = self.mask.index_select(0, rows)
        keys = [k.index_select(0, rows) for k in self.keys]
        values = [v.index_select(0, rows) for v in self.values]
        out = KVCache(keys, values, mask)
        out.trim_left()
        return out

    def extend(self, other: KVCache) -> KVCache:
        """Rows of self followed by rows of other (left-padded to a common length)."""
        if self.batch_size == 0:
            return other
        keys = [cat_rows(a, b, 2) for a, b in zip(self.keys, other.keys)]
        values = [cat_rows(a, b, 2) for a, b in zip(self.values, other.values)]
        mask = cat_rows(self.mask, other.mask, 1)
        return KVCache(keys, values, mask)

    def trim_left(self) -> None:
        if self.mask is None or self.mask.shape[0] == 0:
            return
        used = self.mask.any(dim=0)
        first = int(used.nonzero()[0]) if bool(used.any()) else self.mask.shape[1]
        if first > 0:
            self.mask = self.mask[:, first:]
            self.keys = [k[:, :, first:] for k in self.keys]
            self.values = [v[:, :, first:] for v in self.values]
