"""KV rows of a continuous batch in preallocated buffers: rows join, fork and leave by copying
only the rows concerned, and a decode step writes one column instead of re-concatenating the cache.

Layout: per layer, keys and values live in buffers (B_cap, kv_heads, C_cap, head_dim); the batch
is rows [0, B) and the live time window columns [start, end), shared by every row (left padding),
with a boolean mask (B, L) of which columns hold real tokens. Both have spare room: a step writes
column `end` in place (transformers' DynamicCache concatenates, copying the whole cache every
step), dead leading columns are dropped by moving `start` (no copy), and a longer prompt joins by
moving `start` left into the free room. A buffer is reallocated (the live window copied once)
only when that room runs out, doubling, so the copies are amortised over many steps.

Row operations and what they copy:
- add(prompt kv, copies): the new rows' prompt columns only.
- fork(dst, src): the forked rows' windows, into their existing slots (index_copy_).
- remove(rows): the leaving rows' holes are filled by moving the last surviving rows into them
  (at most one row copied per leaving row); the caller reorders its row list by the order returned.

Every operation that writes runs in inference mode (the buffers are inference tensors, whichever
call allocated them). Host-side bookkeeping (`first`, the first column each row uses) lets the dead-column trim run
without reading the mask back from the device.

Two users: the base model (through `RowCache`, a transformers Cache whose layers are views of
these buffers) and the prefix scorer (through `ScorerKV`, the prefix_scorers KVCache interface).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class KVRows:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.k: list[torch.Tensor] = []  # per layer (B_cap, kv_heads, C_cap, head_dim); empty until the first add
        self.v: list[torch.Tensor] = []
        self.mask_buf: torch.Tensor | None = None  # (B_cap, C_cap) bool
        self.size = 0
        self.start = self.end = 0  # live window [start, end) in buffer columns
        self.staged = 0  # columns written past `end` by the step running now (see stage/commit)
        self.first: list[int] = []  # per row: first buffer column it may use (all before it are False)
        self.reallocations = 0  # buffer copies (tests, profiling)

    # -- views ------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.size

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def mask(self) -> torch.Tensor:
        """(B, L) bool: which window columns hold real tokens (a view: in-place edits stick)."""
        return self.mask_buf[:self.size, self.start:self.end]

    def keys(self, layer: int) -> torch.Tensor:
        """(B, kv_heads, L + staged, head_dim) view."""
        return self.k[layer][:self.size, :, self.start:self.end + self.staged]

    def values(self, layer: int) -> torch.Tensor:
        return self.v[layer][:self.size, :, self.start:self.end + self.staged]

    # -- a step: stage the new columns' mask, each layer appends, commit ------------------------------
    @torch.inference_mode()
    def stage(self, valid: torch.Tensor) -> torch.Tensor:
        """Open T new columns for the step about to run; valid (B, T) bool. Returns the mask
        (B, L + T) the step attends with (a view)."""
        T = valid.shape[1]
        self._reserve(self.size, 0, T)
        self.staged = T
        self.mask_buf[:self.size, self.end:self.end + T] = valid
        return self.mask_buf[:self.size, self.start:self.end + T]

    @torch.inference_mode()
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys/values (B, kv_heads, T, head_dim) into the staged columns;
        returns the layer's keys/values over the window and the staged columns (views)."""
        T = k.shape[2]
        self.k[layer][:self.size, :, self.end:self.end + T] = k
        self.v[layer][:self.size, :, self.end:self.end + T] = v
        return self.keys(layer), self.values(layer)

    def commit(self) -> None:
        self.end += self.staged
        self.staged = 0

    # -- row operations -----------------------------------------------------------------------------
    @torch.inference_mode()
    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor, copies: int) -> None:
        """Append `copies` rows sharing one prompt: keys/values per layer (1, kv_heads, P, head_dim),
        mask (1, P). The prompt is right-aligned with the window (left padding)."""
        P = mask.shape[1]
        if not self.k:
            self._allocate(keys[0], values[0], copies, P)
        self._reserve(self.size + copies, P, 0)
        if P > self.length:  # the window grows to the left into free room: those columns are padding
            old = self.start
            self.start = self.end - P
            self.mask_buf[:self.size, self.start:old] = False
        b0, b1 = self.size, self.size + copies
        self.mask_buf[b0:b1, self.start:self.end] = False
        if P:
            self.mask_buf[b0:b1, self.end - P:self.end] = mask
            for layer in range(self.num_layers):
                self.k[layer][b0:b1, :, self.end - P:self.end] = keys[layer]
                self.v[layer][b0:b1, :, self.end - P:self.end] = values[layer]
        self.size = b1
        self.first += [self.end - P] * copies

    @torch.inference_mode()
    def fork(self, dst: list[int], src: list[int]) -> None:
        """Row dst[i] becomes a copy of row src[i] (sources read before any destination is written)."""
        if not dst:
            return
        d = torch.tensor(dst, dtype=torch.long, device=self.mask_buf.device)
        s = torch.tensor(src, dtype=torch.long, device=self.mask_buf.device)
        window = slice(self.start, self.end)
        for buf in [*self.k, *self.v]:
            live = buf[:, :, window]
            live.index_copy_(0, d, live.index_select(0, s))
        live = self.mask_buf[:, window]
        live.index_copy_(0, d, live.index_select(0, s))
        firsts = [self.first[j] for j in src]
        for i, f in zip(dst, firsts):
            self.first[i] = f
        self.trim()  # an overwritten row may have been the one that used the oldest columns

    def remove(self, rows: list[int]) -> list[int]:
        """Drop rows; returns the new order (new row i was old row order[i]). The last surviving
        rows move into the holes, so at most len(rows) rows are copied."""
        gone = set(rows)
        keep = self.size - len(gone)
        holes = sorted(i for i in gone if i < keep)
        movers = [i for i in range(keep, self.size) if i not in gone]
        order = list(range(keep))
        for h, m in zip(holes, movers):
            order[h] = m
        if holes:
            self.fork(holes, movers)
        self.size = keep
        self.first = [self.first[j] for j in order]
        self.trim()
        return order

    def clear(self) -> None:
        """Drop every row (a failed step: whatever it staged or added is forgotten too)."""
        self.size, self.first, self.staged = 0, [], 0
        self.trim()

    def trim(self) -> None:
        """Drop leading columns no row uses (host bookkeeping only: moves `start`)."""
        if self.mask_buf is None:
            return
        if self.size == 0:  # nothing live: recentre the empty window (no copy)
            self.start = self.end = self.mask_buf.shape[1] // 2
            return
        self.start = max(self.start, min(min(self.first), self.end))

    # -- buffers ------------------------------------------------------------------------------------
    def _allocate(self, k: torch.Tensor, v: torch.Tensor, rows: int, width: int) -> None:
        cap_rows, cap_cols = max(4, rows), max(64, 2 * width)
        front = (cap_cols - width) // 4
        _, heads, _, kd = k.shape
        self.k = [k.new_zeros(cap_rows, heads, cap_cols, kd) for _ in range(self.num_layers)]
        self.v = [v.new_zeros(cap_rows, heads, cap_cols, v.shape[-1]) for _ in range(self.num_layers)]
        self.mask_buf = torch.zeros(cap_rows, cap_cols, dtype=torch.bool, device=k.device)
        self.start = self.end = front + width
        self.first = []

    def _reserve(self, rows: int, width: int, extra: int) -> None:
        """Room for `rows` rows, a window of at least `width` columns and `extra` columns after it;
        reallocates (doubling, copying the live window once) only when there is not."""
        cap_rows, cap_cols = self.mask_buf.shape
        front_needed = max(0, width - self.length)
        if rows <= cap_rows and self.start >= front_needed and self.end + extra <= cap_cols:
            return
        live = max(width, self.length)
        new_rows = max(cap_rows, rows) if rows <= cap_rows else max(2 * cap_rows, rows)
        new_cols = max(cap_cols, 2 * (live + extra))
        front = (new_cols - live - extra) // 4
        new_end = front + live
        shift = new_end - self.end
        L = self.length
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                new = old.new_zeros(new_rows, old.shape[1], new_cols, old.shape[3])
                new[:self.size, :, new_end - L:new_end] = old[:self.size, :, self.start:self.end]
                bufs[i] = new
        mask = torch.zeros(new_rows, new_cols, dtype=torch.bool, device=self.mask_buf.device)
        mask[:self.size, new_end - L:new_end] = self.mask_buf[:self.size, self.start:self.end]
        self.mask_buf = mask
        self.start, self.end = new_end - L, new_end
        self.first = [f + shift for f in self.first]
        self.reallocations += 1


class _RowLayer(DynamicLayer):
    """One layer of RowCache: keys/values are views of the KVRows buffers."""

    def __init__(self, kv: KVRows, layer: int):
        super().__init__()
        self.kv, self.layer = kv, layer
        self.is_initialized = True

    @property
    def keys(self) -> torch.Tensor:
        return self.kv.keys(self.layer)

    @keys.setter
    def keys(self, value) -> None:  # the base class's __init__ assigns; the buffers are the truth
        pass

    @property
    def values(self) -> torch.Tensor:
        return self.kv.values(self.layer)

    @values.setter
    def values(self, value) -> None:
        pass

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.kv.append(self.layer, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.kv.length  # the committed window: the step running now is not counted yet


class RowCache(Cache):
    """The base model's cache for transformers: every layer reads and writes KVRows."""

    def __init__(self, kv: KVRows):
        super().__init__(layers=[_RowLayer(kv, i) for i in range(kv.num_layers)])
        self.kv = kv


class ScorerKV:
    """KVRows behind the interface the prefix scorer's forward uses (prefix_scorers.kv_cache.KVCache:
    length, mask, append). The scorer assigns the mask with the new columns before its layers
    append; that assignment stages them, and the caller commits after the forward."""

    def __init__(self, kv: KVRows):
        self.kv = kv

    @property
    def length(self) -> int:
        return self.kv.length

    @property
    def mask(self) -> torch.Tensor:
        return self.kv.mask

    @mask.setter
    def mask(self, key_valid: torch.Tensor) -> None:  # (B, L + T): the committed columns, then the new ones
        self.kv.stage(key_valid[:, self.kv.length:])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv.append(layer, k, v)
