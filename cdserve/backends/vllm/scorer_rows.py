"""The scorer's per-request state inside a vLLM worker, keyed by vLLM's persistent-batch index.

vLLM tells logits processors how its batch changed (`BatchUpdate`: removed, added, moved) and
hands each added request a live reference to its output token list. `ScorerRows` mirrors that
bookkeeping for the controlled requests only: each has a row in one left-padded scorer KV cache
(kv_manager.KVRows, the hf engine's: preallocated, a step writes one column, a row that leaves
is filled by moving one row, none of them copies the whole cache),
and at every step all rows read their new tokens in one batched scorer call (`sync`), leaving the
queries that value every possible next token. Pure torch: tested without vLLM.

Rows that start with the same context (whole PREFIX_BLOCK-token blocks of their prompts) share its
keys/values (`SharedPrefix`): it is read once, kept once, and each step attends to it once per
group of rows (one matmul), their cache rows holding only what follows it. Without this every row
kept its own copy and each step read all of them: at 64 rows after a 512-token context, 60 MB per
layer per step, the largest part of the scorer's step.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cdserve.backends.hf.kv_manager import KVRows, ScorerKV
from cdserve.backends.scorer_prefix_cache import PREFIX_BLOCK, block_hashes
from prefix_scorers.kv_cache import KVCache
from prefix_scorers.model import PrefixScorer, attention

# Results of rows that left the batch, kept until the server fetches them (bounded: a request
# the server aborted is never fetched).
MAX_FINISHED = 1024
# A new row reuses the scorer keys/values of a live row's prompt prefix in whole blocks of
# PREFIX_BLOCK tokens (vLLM's prefix caching does the same for the base model, so without it a
# shared context would be recomputed by the scorer alone); the server-side scorer's prefix cache
# uses the same blocks and hashes.


@dataclass(frozen=True)
class TokenControl:
    """Token-mode settings of one request, read from SamplingParams.extra_args["cdserve"]."""

    key: str  # the server's id for this choice (vLLM's request id is not visible here)
    weights: tuple[float, ...]
    strength: float
    top_k: int
    temperature: float
    top_p: float = 1.0
    steer: bool = True  # False: only measure the KL of top-p truncation (modes none/block/best_of_n)
    by_output: bool = False  # results keyed by key@output ids (block candidates share one key)
    measure: bool = True  # unsteered rows: measure top-p's KL (False: only segment ends)
    entropy_threshold: float | None = None  # block segment "entropy": end before a token above it
    sentinel: int = -1  # ...by forcing this token, a stop token of the request, in its place
    risk: float = 0.0  # each head valued at its ensemble's mean + risk * spread
    keep_tail: bool = False  # tokens outside the top_k kept in their base proportions (control.tail "keep")
    plausibility: float = 0.0  # steering.hold_implausible (control.plausibility)
    unheld: tuple[int, ...] = ()  # ...never applied to these ids, the model's end-of-sequence tokens


@dataclass(eq=False)
class SharedPrefix:
    """Scorer keys/values of the first `length` tokens of the prompts of rows that share them."""

    tokens: list[int]
    keys: list[torch.Tensor]  # per layer (kv_heads, length, head_dim)
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class Row:
    control: TokenControl
    prompt: list[int]
    output: list[int]  # vLLM's live list: it grows as tokens are sampled
    slot: int = -1  # row of the scorer cache; -1 until prefilled
    consumed: int = 0  # tokens of prompt + output the scorer has read
    shared: SharedPrefix | None = None  # its first tokens' keys/values; its cache row holds the rest
    kl: list[torch.Tensor] = field(default_factory=list)  # per generated token, 0-dim views
    forget: bool = False  # the server aborted it: drop its results when it leaves

    @property
    def result_key(self) -> str:
        return result_key(self.control.key, self.output) if self.control.by_output else self.control.key

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def token(self, i: int) -> int:
        n = len(self.prompt)
        return self.prompt[i] if i < n else self.output[i - n]


def result_key(key: str, output: Sequence[int]) -> str:
    """Where a block candidate's KL is kept: its group's key and its tokens."""
    return f"{key}@{','.join(map(str, output))}"


def parse_control(extra_args: dict | None, num_heads: int, temperature: float,
                  top_p: float = 1.0) -> TokenControl | None:
    """None unless the request asks for token mode. Raises ValueError naming the bad field
    (vLLM turns it into a 400 when raised from `validate_params`)."""
    spec = (extra_args or {}).get("cdserve")
    if spec is None:
        return None
    if spec.get("mode") != "token":
        segment = _entropy_segment(spec.get("entropy"))
        if not spec.get("measure") and segment is None:
            return None
        threshold, sentinel = segment or (None, -1)
        return TokenControl(key=str(spec.get("key", "")), weights=(), strength=0.0, top_k=0,
                            temperature=float(temperature), top_p=float(top_p), steer=False,
                            by_output=bool(spec.get("by_output")), measure=bool(spec.get("measure")),
                            entropy_threshold=threshold, sentinel=sentinel)
    weights = spec.get("weights")
    if not isinstance(weights, (list, tuple)) or len(weights) != num_heads:
        raise ValueError(f"cdserve.weights must list one weight per scorer head ({num_heads}), got {weights!r}")
    strength, top_k, risk = spec.get("strength"), spec.get("top_k"), spec.get("risk", 0.0)
    plausibility = spec.get("plausibility", 0.0)
    values = [*weights, strength, risk, plausibility]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError("cdserve.weights, cdserve.strength, cdserve.risk and cdserve.plausibility must be finite "
                         f"numbers, got {values!r}")
    if strength < 0:
        raise ValueError(f"cdserve.strength must be >= 0, got {strength}")
    if not -1 <= risk <= 1:
        raise ValueError(f"cdserve.risk must be between -1 and 1, got {risk}")
    if not 0 <= plausibility < 1:
        raise ValueError(f"cdserve.plausibility must be in [0, 1), got {plausibility}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"cdserve.top_k must be an integer >= 0 (0: whole vocabulary), got {top_k!r}")
    tail = spec.get("tail", "drop")
    if tail not in ("drop", "keep"):
        raise ValueError(f"cdserve.tail must be 'drop' or 'keep', got {tail!r}")
    return TokenControl(key=str(spec.get("key", "")), weights=tuple(float(w) for w in weights),
                        strength=float(strength), top_k=top_k, temperature=float(temperature),
                        top_p=float(top_p), risk=float(risk), keep_tail=tail == "keep",
                        plausibility=float(plausibility), unheld=tuple(int(t) for t in spec.get("unheld", ())))


def _entropy_segment(spec) -> tuple[float, int] | None:
    """extra_args["cdserve"]["entropy"] = {"threshold": nats, "sentinel": token id} (block.py)."""
    if spec is None:
        return None
    threshold, sentinel = (spec.get("threshold"), spec.get("sentinel")) if isinstance(spec, dict) else (None, None)
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"cdserve.entropy.threshold must be a finite number > 0 (nats), got {threshold!r}")
    if not isinstance(sentinel, int) or sentinel < 0:
        raise ValueError(f"cdserve.entropy.sentinel must be a token id >= 0, got {sentinel!r}")
    return float(threshold), sentinel


class ScorerRows:
    """Controlled requests of one vLLM persistent batch and their scorer KV cache."""

    def __init__(self, scorer: PrefixScorer, device: torch.device):
        self.scorer = scorer
        self.device = device
        self.num_layers = len(scorer.layers)
        self.by_index: dict[int, Row] = {}  # vLLM batch index -> row
        self.slots: list[Row] = []  # cache row order
        self.kv = KVRows(self.num_layers)
        self.cache = SharedPrefixKV(self.kv)  # what the scorer's forward reads and appends to
        self.shared: dict[int, SharedPrefix] = {}  # hash of its blocks (block_hashes) -> prefix
        self.queries: torch.Tensor | None = None  # (len(slots), H*E, d_e), at each row's last token
        self.finished: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self._dropped = False
        self.prefixes: dict[int, Row] = {}  # hash of a prompt's first j blocks -> a row that read them
        self.prefill_tokens = 0  # tokens the scorer read in prefills (counters: tests, profiling)
        self.reused_tokens = 0  # prompt tokens whose keys/values were copied from a live row instead

    def __len__(self) -> int:
        return len(self.by_index)

    # -- vLLM's batch bookkeeping (order: removed, added, moved) ------------------------------
    def remove(self, index: int) -> None:
        row = self.by_index.pop(index, None)
        if row is None:
            return
        if row.slot >= 0:
            self._dropped = True
        if not row.forget and row.control.key:
            # Preemption also removes a request; it may come back and continue its KL sum.
            self.finished[row.result_key] = row.kl
            self.finished.move_to_end(row.result_key)
            while len(self.finished) > MAX_FINISHED:
                self.finished.popitem(last=False)

    def add(self, index: int, control: TokenControl | None, prompt: Sequence[int] | None,
            output: list[int]) -> None:
        self.remove(index)  # an added request may replace the one at its index
        if control is None:
            return
        if prompt is None:
            raise ValueError("token-mode control needs prompt token ids (prompt embeddings are not supported)")
        row = Row(control, list(prompt), output)
        row.kl = self.finished.pop(row.result_key, [])[: len(output)]
        self.by_index[index] = row

    def move(self, src: int, dst: int, swap: bool) -> None:
        """A swap exchanges two requests; a one-way move replaces whatever was at dst (vLLM
        condenses its batch this way: a finished request's index may only show up here)."""
        a = self.by_index.pop(src, None)
        if swap:
            b = self.by_index.pop(dst, None)
            if b is not None:
                self.by_index[src] = b
        else:
            self.remove(dst)
        if a is not None:
            self.by_index[dst] = a

    def end_update(self) -> None:
        """After a batch update: with no controlled request left, free the cache now rather than
        at the next controlled step."""
        if not self.by_index and self.slots:
            self.slots, self.queries, self._dropped = [], None, False
            self.kv.clear()

    def forget(self, keys: Sequence[str]) -> None:
        """The server aborted these choices: drop their results now or when they leave."""
        keys = set(keys)
        for row in self.by_index.values():
            if row.control.key in keys or row.result_key in keys:
                row.forget = True
        for k in keys:
            self.finished.pop(k, None)

    def kl_of(self, key: str, num_tokens: int) -> float | None:
        """Sum of KL(steered || base) over a choice's first num_tokens tokens (None if unknown)."""
        row = next((r for r in self.by_index.values() if r.result_key == key), None)
        steps = None
        if row is not None:  # finished but not yet removed from vLLM's batch
            row.forget = True
            steps = row.kl
        if steps is None:
            steps = self.finished.pop(key, None)
        if steps is None:
            return None
        steps = steps[:num_tokens]
        return float(torch.stack(steps).double().sum()) if steps else 0.0

    # -- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def sync(self) -> None:
        """Read every row's new tokens: one incremental scorer call for the rows already in the
        cache (one token each), one batched prefill for the new ones."""
        if self._dropped:
            self._compact()
        old = [r for r in self.slots if r.consumed < r.length]
        if old and any(r.length - r.consumed > 1 or r.consumed > r.length for r in old):
            # More than one new token (tokens discarded or re-added by vLLM): re-read those rows.
            for r in self.slots:
                if r.length - r.consumed > 1 or r.consumed > r.length:
                    r.slot, r.consumed, r.shared = -1, 0, None
            self._dropped = True
            self._compact()
        self._step_cached()
        fresh = [r for r in self.by_index.values() if r.slot < 0 and r.control.steer]
        if fresh:
            self._prefill(fresh)

    def _compact(self) -> None:
        live = {id(r) for r in self.by_index.values()}
        gone = [i for i, r in enumerate(self.slots) if r.slot < 0 or id(r) not in live]
        order = self.kv.remove(gone)  # the last rows move into the holes
        self.slots = [self.slots[j] for j in order]
        self.queries = self.queries.index_select(0, torch.tensor(order, dtype=torch.long, device=self.device)) \
            if order else None
        for i, r in enumerate(self.slots):
            r.slot = i
        used = {id(r.shared) for r in self.slots}
        self.shared = {h: p for h, p in self.shared.items() if id(p) in used}
        self._dropped = False

    def _step_cached(self) -> None:
        if not self.slots or all(r.consumed >= r.length for r in self.slots):
            return
        new = [r.consumed < r.length for r in self.slots]
        tokens = torch.tensor([r.token(r.consumed) if n else 0 for r, n in zip(self.slots, new)],
                              device=self.device)
        valid = torch.tensor(new, device=self.device)
        shared = torch.tensor([r.shared.length if r.shared else 0 for r in self.slots], device=self.device)
        positions = self.kv.mask.sum(1, keepdim=True) + shared[:, None]  # (R, 1): next position of each row
        self.cache.groups = _groups(self.slots, self.device)
        try:
            q = self.scorer(tokens[:, None], positions=positions, valid=valid[:, None],
                            cache=self.cache).queries[:, -1]  # (R, H, d_e)
        finally:
            self.cache.groups = []
        self.kv.commit()
        self.queries = torch.where(valid[:, None, None], q, self.queries)
        for r, n in zip(self.slots, new):
            r.consumed += n

    def _prefill(self, rows: list[Row]) -> None:
        """Read new rows: those whose prompt starts with a live row's (whole blocks) copy that
        prefix's keys/values and read only the rest; the others are prefilled together, one row
        per distinct first block first, so that rows sharing a context arriving together read it
        once."""
        pending = rows
        while pending:
            found = [(r, self._donor(r)) for r in pending]
            reuse = [(r, d) for r, d in found if d is not None]
            if reuse:
                self._prefill_from_prefix(reuse)
            alone = [r for r, d in found if d is None]
            leaders, pending, seen = [], [], set()
            for r in alone:
                first = block_hashes(r.prompt)[:1]
                (pending if first and first[0] in seen else leaders).append(r)
                seen.update(first)
            if leaders:
                self._prefill_batch(leaders)

    def _donor(self, row: Row) -> tuple[Row, int] | None:
        """A live row in the cache whose prompt starts with the most whole blocks of row's prompt,
        and how many tokens they share (fewer than row's sequence: its last token is read anew)."""
        limit = row.length - 1
        for j, h in reversed(list(enumerate(block_hashes(row.prompt), 1))):
            n = j * PREFIX_BLOCK
            d = self.prefixes.get(h)
            if n > limit or d is None:
                continue
            if 0 <= d.slot < len(self.slots) and self.slots[d.slot] is d and d.prompt[:n] == row.prompt[:n]:
                return d, n
        return None

    def _prefill_from_prefix(self, found: list[tuple[Row, tuple[Row, int]]]) -> None:
        """Each row: the shared keys/values of its first n tokens (made from the donor's when
        none exist yet) then a forward over the rest of the sequence, which alone joins the cache."""
        for row, (donor, n) in found:
            row.shared = shared = self._shared_prefix(donor, n)
            cache = KVCache([k[None] for k in shared.keys], [v[None] for v in shared.values],
                            torch.ones(1, n, dtype=torch.bool, device=self.device))
            seq = row.prompt + list(row.output)
            ids = torch.tensor([seq[n:]], device=self.device)
            positions = torch.arange(n, len(seq), device=self.device)[None]
            queries = self.scorer(ids, positions=positions, cache=cache, last_only=True).queries[:, -1]
            self.prefill_tokens += len(seq) - n
            self.reused_tokens += n
            self._add(cache, queries, [row])

    def _shared_prefix(self, donor: Row, n: int) -> SharedPrefix:
        """The SharedPrefix of donor's first n tokens (whole blocks): an existing one, or one made
        from the donor's keys/values, which the donor then uses too (its cache row drops them)."""
        h = block_hashes(donor.prompt[:n])[-1]
        found = self.shared.get(h)
        if found is not None and found.tokens == donor.prompt[:n]:
            return found
        s = donor.shared.length if donor.shared else 0
        own = max(0, n - s)  # donor's own columns in the prefix: the first ones of its cache row
        first = self.kv.first[donor.slot]
        cols = slice(first - self.kv.start, first - self.kv.start + own)
        parts = [(p.keys[i][:, :min(s, n)], p.values[i][:, :min(s, n)]) if (p := donor.shared) else None
                 for i in range(self.num_layers)]
        keys, values = [], []
        for i in range(self.num_layers):
            k, v = self.kv.keys(i)[donor.slot, :, cols], self.kv.values(i)[donor.slot, :, cols]
            keys.append(torch.cat([parts[i][0], k], 1) if parts[i] else k.clone())
            values.append(torch.cat([parts[i][1], v], 1) if parts[i] else v.clone())
        shared = self.shared[h] = SharedPrefix(donor.prompt[:n], keys, values)
        if own:  # the donor reads its first n tokens from the shared prefix from now on
            self.kv.mask_buf[donor.slot, first:first + own] = False
            self.kv.first[donor.slot] = first + own
            self.kv.trim()
            donor.shared = shared
        return shared

    def _prefill_batch(self, rows: list[Row]) -> None:
        """Left-padded batched prefill of whole sequences (prompt + output so far)."""
        seqs = [r.prompt + list(r.output) for r in rows]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        valid = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, T - len(s):] = torch.tensor(s)
            valid[i, T - len(s):] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        cache = KVCache.empty(self.num_layers)
        q = self.scorer(ids, positions=positions, valid=valid, cache=cache, last_only=True).queries[:, -1]
        self.prefill_tokens += sum(len(s) for s in seqs)
        self._add(cache, q, rows)

    def _add(self, cache: KVCache, queries: torch.Tensor, rows: list[Row]) -> None:
        """Rows that have read their whole sequence join the cache (and can lend their prefix)."""
        for i, r in enumerate(rows):  # each row's own tokens: the last columns (left padding)
            cols = slice(cache.length - r.length + (r.shared.length if r.shared else 0), cache.length)
            self.kv.add([k[i:i + 1, :, cols] for k in cache.keys], [v[i:i + 1, :, cols] for v in cache.values],
                        cache.mask[i:i + 1, cols], 1)
        self.queries = queries if self.queries is None else torch.cat([self.queries, queries])
        for i, r in enumerate(rows):
            r.slot, r.consumed = len(self.slots) + i, r.length
            for h in block_hashes(r.prompt):
                self.prefixes[h] = r
        self.slots = self.slots + rows
        if len(self.prefixes) > 64 * max(len(self.slots), 16):  # drop what rows that left registered
            live = [r for r in self.slots if r.slot >= 0]
            self.prefixes = {h: r for r in live for h in block_hashes(r.prompt)}

    def controlled(self, num_rows: int) -> list[tuple[int, Row]]:
        """(batch index, row) of the rows to steer this step, in batch order."""
        return sorted((i, r) for i, r in self.by_index.items() if i < num_rows and r.control.steer)

    def measured(self, num_rows: int) -> list[tuple[int, Row]]:
        """(batch index, row) of the unsteered rows whose top-p truncation KL is kept."""
        return sorted((i, r) for i, r in self.by_index.items()
                      if i < num_rows and not r.control.steer and r.control.measure)

    def segmented(self, num_rows: int) -> list[tuple[int, Row]]:
        """(batch index, row) of the block candidates with entropy segments."""
        return sorted((i, r) for i, r in self.by_index.items()
                      if i < num_rows and r.control.entropy_threshold is not None)


class SharedPrefixKV(ScorerKV):
    """The worker's scorer cache: KVRows whose rows may start with a SharedPrefix. During a step
    (`groups` set: the rows of each prefix), attention covers the rows' own columns as usual and
    each group's prefix with one product for the whole group, merged by their log-sum-exps."""

    def __init__(self, kv: KVRows):
        super().__init__(kv)
        self.groups: list[tuple[torch.Tensor, SharedPrefix]] = []  # (rows (R,), their prefix)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: torch.Tensor) -> torch.Tensor:
        if not self.groups:
            return attention(layer, q, k, v, attn_mask)
        B, nh, T, hs = q.shape
        nkv = k.shape[1]
        g = nh // nkv
        assert T == 1, "shared prefixes are attended in one-token steps"
        q = q.view(B, nkv, g, hs) * hs**-0.5  # query heads grouped by their key head
        scores = (q @ k.transpose(-1, -2)).masked_fill_(~attn_mask, float("-inf"))  # (B, nkv, g, L)
        lse = scores.logsumexp(-1, keepdim=True)  # (B, nkv, g, 1); every row sees at least itself
        out = (scores - lse).exp_() @ v  # (B, nkv, g, hs)
        for rows, prefix in self.groups:
            rows = slice(None) if len(rows) == B else rows  # one context for the whole batch: views
            qp = q[rows].transpose(0, 1).reshape(nkv, -1, hs)  # (nkv, R*g, hs)
            sp = qp @ prefix.keys[layer].transpose(-1, -2)  # (nkv, R*g, n)
            lse_p = sp.logsumexp(-1, keepdim=True)
            out_p = ((sp - lse_p).exp_() @ prefix.values[layer]).view(nkv, -1, g, hs).transpose(0, 1)
            lse_p = lse_p.view(nkv, -1, g, 1).transpose(0, 1)  # (R, nkv, g, 1)
            total = torch.logaddexp(lse[rows], lse_p)
            out[rows] = out[rows] * (lse[rows] - total).exp() + out_p * (lse_p - total).exp()
        return out.view(B, nh, 1, hs)


def _groups(rows: list[Row], device: torch.device) -> list[tuple[torch.Tensor, SharedPrefix]]:
    """Rows (cache order) by the shared prefix they start with."""
    by: dict[int, tuple[list[int], SharedPrefix]] = {}
    for i, r in enumerate(rows):
        if r.shared is not None:
            by.setdefault(id(r.shared), ([], r.shared))[0].append(i)
    return [(torch.tensor(ix, device=device), p) for ix, p in by.values()]
