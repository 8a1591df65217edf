"""Token mode over one step's rows, the code both engines run (hf: steer_step.py; vLLM: the
worker's logits_processor.py): each row's logits become

    logits'(z) = logits(z) + strength * sum_h w_h (Q_h(z) - mean_h[pos]) / std_h[pos]

over its top_k tokens (-inf elsewhere, or the base logits + strength * the top_k's base-weighted
mean value where the row keeps its tail; top_k 0: every token), Q_h being the head's ensemble
mean + risk * spread, and each row's KL(sampled || base), the control.kl term (README, "What
control.kl measures"; steering.sampled_kl).

`steer_in_place` writes the steered rows into the batch's logits. Top-k rows never build their
(N, V) steered rows: the row is filled with -inf and its k steered logits written, and the KL comes
from the k candidates (steering.top_k_kl, one logsumexp over the vocabulary), about four passes
over the vocabulary per row where the whole-vocabulary path (steer_rows, sampled_kl) makes some
twenty. Rows that keep their tail take the same path: the tail is the base row shifted by one
value, and its KL has a closed form (steering._kept_tail_kl); where top-p truncates such a row, or
it is greedy, it takes `steer_rows`, the whole-vocabulary definition, used for top_k 0 and as the
reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cdserve.control.steering import (
    combine_heads,
    hold_implausible,
    risk_adjusted,
    sampled_kl,
    steer_full,
    steer_top_k,
    steer_top_k_values,
    tail_value,
    top_k_candidates,
    top_k_kl,
)
from prefix_scorers.model import PrefixScorer


@dataclass(frozen=True)
class TokenRows:
    """One step's token-mode rows as an engine describes them: settings on the host (splitting
    the rows by top_k and the top-p / greedy hints then read nothing from the device), the
    scorer's queries on the device."""

    index: list[int]  # each row's row in the batch's logits
    queries: torch.Tensor  # (N, H*E, d_e): values of every possible next token (PrefixScorer.values_at)
    weights: list[Sequence[float]]  # (N, H)
    strength: list[float]
    top_k: list[int]  # 0: the whole vocabulary
    risk: list[float]  # each head valued at mean + risk * spread of its ensemble
    positions: list[int]  # index in the answer of the token being generated
    temperature: list[float]  # the sampler's; 0: greedy
    top_p: list[float]
    keep_tail: list[bool] | None = None  # top-k rows: tokens outside the top k kept (steering.tail_value)
    plausibility: list[float] | None = None  # steering.hold_implausible (None: 0, no hold)
    unheld: tuple[int, ...] = ()  # token ids the hold never applies to: the model's end-of-sequence ids

    def tail(self, j: int) -> bool:
        return bool(self.keep_tail and self.keep_tail[j])

    def subset(self, js: list[int]) -> TokenRows:
        pick = lambda xs: [xs[j] for j in js]
        return TokenRows(pick(self.index), self.queries[torch.tensor(js, device=self.queries.device)],
                         pick(self.weights), pick(self.strength), pick(self.top_k), pick(self.risk),
                         pick(self.positions), pick(self.temperature), pick(self.top_p),
                         pick(self.keep_tail) if self.keep_tail else None,
                         pick(self.plausibility) if self.plausibility else None, self.unheld)


@torch.inference_mode()
def steer_in_place(scorer: PrefixScorer, logits: torch.Tensor, rows: TokenRows) -> torch.Tensor:
    """Steer rows.index of logits (B, V) in place; returns each row's KL(sampled || base) (N,)
    float32 at its temperature and top-p (greedy rows: 0 or inf, as sampled_kl)."""
    kl = torch.zeros(len(rows.index), device=logits.device)
    groups: dict[str, list[int]] = {"drop": [], "keep": [], "full": []}
    for j, k in enumerate(rows.top_k):
        # a kept tail that top-p truncates, or a greedy one, takes the whole-vocabulary definition
        closed = rows.top_p[j] >= 1 and rows.temperature[j] > 0
        groups["full" if k == 0 or (rows.tail(j) and not closed) else "keep" if rows.tail(j) else "drop"].append(j)
    steers = {"drop": _steer_top_k, "keep": _steer_kept_tail, "full": _steer_vocabulary}
    for name, js in groups.items():
        if len(js) == len(rows.index):
            return steers[name](scorer, logits, rows)
        if js:
            kl[js] = steers[name](scorer, logits, rows.subset(js))
    return kl


def _steer_kept_tail(scorer: PrefixScorer, logits: torch.Tensor, rows: TokenRows) -> torch.Tensor:
    return _steer_top_k(scorer, logits, rows, keep_tail=True)


def _steer_top_k(scorer: PrefixScorer, logits: torch.Tensor, rows: TokenRows, keep_tail: bool = False) -> torch.Tensor:
    dev = logits.device
    index = torch.tensor(rows.index, device=dev)
    # Every read of base comes before the rows are written: when they are one run of the batch
    # (usually the whole batch), base is a view, not a copy of the rows.
    span = _run(rows.index)
    base = logits[span] if span else logits.index_select(0, index)  # (N, V)
    mean, std = scorer.norm_stats(torch.tensor(rows.positions, device=dev))  # (N, H)
    weights = torch.tensor(rows.weights, device=dev, dtype=rows.queries.dtype)
    cands, combined = top_k_values(scorer, base, rows.queries, weights, rows.top_k, mean, std,
                                   torch.tensor(rows.risk, device=dev))  # (N, k) each
    if rows.plausibility and any(rows.plausibility):
        combined = hold_implausible(base, cands, combined, torch.tensor(rows.plausibility, device=dev),
                                    torch.tensor(rows.unheld, device=dev, dtype=torch.long))
    strength = torch.tensor(rows.strength, device=dev, dtype=base.dtype)
    ids, steered = steer_top_k_values(base, cands, combined.to(base.dtype), strength)  # (N, k) each
    shift = strength * tail_value(base, cands, combined.to(base.dtype))[:, 0] if keep_tail else None  # (N,)
    kl = top_k_kl(steered, cands, base, torch.tensor(rows.temperature, device=dev),
                  torch.tensor(rows.top_p, device=dev), truncate=min(rows.top_p) < 1,
                  any_greedy=min(rows.temperature) <= 0, tail_shift=shift)
    if span:
        rest = logits[span].add_(shift[:, None]) if keep_tail else logits[span].fill_(float("-inf"))
        rest.scatter_(1, ids, steered)
    else:
        if keep_tail:
            logits.index_copy_(0, index, base.add_(shift[:, None]))
        else:
            logits.index_fill_(0, index, float("-inf"))
        logits.index_put_((index[:, None].expand_as(ids), ids), steered)
    return kl


def _run(index: list[int]) -> slice | None:
    """index as a slice if it is a run of consecutive rows."""
    return slice(index[0], index[-1] + 1) if index and index == list(range(index[0], index[-1] + 1)) else None


def _steer_vocabulary(scorer: PrefixScorer, logits: torch.Tensor, rows: TokenRows) -> torch.Tensor:
    dev = logits.device
    index = torch.tensor(rows.index, device=dev)
    base = logits.index_select(0, index)  # (N, V)
    steered = steer_rows(scorer, base, rows.queries,
                         torch.tensor(rows.weights, device=dev, dtype=rows.queries.dtype),
                         torch.tensor(rows.strength, device=dev, dtype=base.dtype), rows.top_k,
                         torch.tensor(rows.positions, device=dev), rows.risk, rows.keep_tail, rows.plausibility,
                         rows.unheld)
    kl = sampled_kl(steered, base, torch.tensor(rows.temperature, device=dev), torch.tensor(rows.top_p, device=dev),
                    truncate=min(rows.top_p) < 1)
    logits.index_copy_(0, index, steered)
    return kl.float()


def steer_rows(scorer: PrefixScorer, base: torch.Tensor, queries: torch.Tensor, weights: torch.Tensor,
               strength: torch.Tensor, top_k: list[int], positions: torch.Tensor,
               risk: list[float] | None = None, keep_tail: list[bool] | None = None,
               plausibility: list[float] | None = None, unheld: tuple[int, ...] = ()) -> torch.Tensor:
    """Token mode's steered rows (N, V), the whole-vocabulary definition: logits + strength *
    sum_h w_h Qnorm_h over each row's top_k (0: the whole vocabulary), -inf elsewhere (in rows with
    keep_tail: the base logits + strength * steering.tail_value), Q_h = mean + risk * spread of the
    head's ensemble, held by steering.hold_implausible where a row asks for plausibility. base (N, V);
    queries (N, H*E, d_e); weights (N, H); strength (N,); top_k, risk, keep_tail and plausibility
    (None: 0, False, 0) on the host (no device sync to split the rows); positions (N,); unheld:
    token ids the hold never applies to."""
    dev = base.device
    E = scorer.ensemble_size
    risk = risk or [0.0] * len(top_k)
    plausibility = plausibility or [0.0] * len(top_k)
    never = torch.tensor(unheld, device=dev, dtype=torch.long) if any(plausibility) else None  # only for the hold
    mean, std = scorer.norm_stats(positions)  # (N, H)
    steered = base.clone()
    full = [j for j, k in enumerate(top_k) if k == 0]
    part = [j for j, k in enumerate(top_k) if k > 0]
    if full:
        f = torch.tensor(full, device=dev)
        if E > 1 and any(risk[j] for j in full):  # the spread is not linear in the queries: value
            raw = scorer.values(queries[f])  # every member on the whole vocabulary (n, H*E, V)
            adjusted = risk_adjusted(raw, E, torch.tensor([risk[j] for j in full], device=dev))
            combined = combine_heads(adjusted, mean[f], std[f], weights[f])
        else:  # the ensemble mean: members mixed before the vocabulary, one (d_e, V) product
            combined = scorer.combined_values(queries[f], mean[f], std[f], weights[f])
        if any(plausibility[j] for j in full):
            combined = hold_implausible(base[f], None, combined,
                                        torch.tensor([plausibility[j] for j in full], device=dev), never)
        steered[f] = steer_full(base[f], combined.to(base.dtype), strength[f])
    if part:
        t = torch.tensor(part, device=dev)
        cands, combined = top_k_values(scorer, base[t], queries[t], weights[t], [top_k[j] for j in part],
                                       mean[t], std[t], torch.tensor([risk[j] for j in part], device=dev))
        if any(plausibility[j] for j in part):
            combined = hold_implausible(base[t], cands, combined,
                                        torch.tensor([plausibility[j] for j in part], device=dev), never)
        tail = [bool(keep_tail and keep_tail[j]) for j in part]
        steered[t] = steer_top_k(base[t], cands, combined.to(base.dtype), strength[t],
                                 torch.tensor(tail, device=dev) if any(tail) else None)
    return steered


def top_k_values(scorer: PrefixScorer, base: torch.Tensor, queries: torch.Tensor, weights: torch.Tensor,
                 top_k: list[int], mean: torch.Tensor, std: torch.Tensor,
                 risk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's top_k (> 0) base candidates (N, k), -1 for unused ranks, and their combined
    values (N, k) (Q_h = mean + risk * spread, normalised, weighted): the scorer's work over the
    top k."""
    cands = top_k_candidates(base, torch.tensor(top_k, device=base.device), max(top_k))  # (N, k)
    raw = scorer.values_at(queries, cands.clamp(min=0))  # (N, H*E, k)
    return cands, combine_heads(risk_adjusted(raw, scorer.ensemble_size, risk), mean, std, weights)
