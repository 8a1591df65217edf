"""What one step does to the base model's logits before the sampler draws, for the batch's rows
(batch.py): segment ends of block candidates, token-mode steering with each row's KL (the code the
vLLM worker runs, token_steering.py), sampling, and the scorer's values of the sampled tokens.

Everything here is decided from host lists (modes, top_k, temperatures, top-p) and reads nothing
back from the device.
"""

from __future__ import annotations

import torch

from cdserve.backends.hf.sampler import sample
from cdserve.backends.hf.sequence import Row
from cdserve.backends.token_steering import TokenRows, steer_in_place
from cdserve.control.segments import entropy_ends
from cdserve.control.steering import sampled_kl
from prefix_scorers.model import PrefixScorer


def segment_ends(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
    """(B,) bool on the device: rows whose candidate ends its block before the token sampled now
    (segment entropy, segments.py), from the base logits (B, V)."""
    ends = torch.zeros(len(rows), dtype=torch.bool, device=logits.device)
    idx = [i for i, r in enumerate(rows) if not r.waiting and r.ctl.control.segment == "entropy"
           and (r.ctl.control.mode == "block" or (r.ctl.pruning and not r.ctl.streaming))]
    if not idx:
        return ends
    sel = torch.tensor(idx, device=logits.device)
    threshold = torch.tensor([rows[i].ctl.control.entropy_threshold for i in idx], device=logits.device)
    taken = torch.tensor([rows[i].ctl.candidates[rows[i].k].grown for i in idx], device=logits.device)
    return ends.index_copy(0, sel, entropy_ends(logits[sel], threshold, taken))


def steer_and_measure(scorer: PrefixScorer, rows: list[Row], controlled: list[int], logits: torch.Tensor,
                      queries: torch.Tensor | None, eos: frozenset[int] | set[int] = frozenset()) -> torch.Tensor:
    """Token-mode rows of logits (B, V) steered in place and the per-token KL(sampled || base)
    (B,) of those and of rows that truncate by top_p (elsewhere 0): the control.kl contract
    (steering.sampled_kl). Pruned best-of-N reports log N alone, on both engines.
    controlled: batch index of each scorer row, whose queries (Bc, H*E, d_e) value its next token;
    eos: the model's end-of-sequence ids, never held by control.plausibility."""
    kl = torch.zeros(len(rows), device=logits.device)
    pick = [] if queries is None else [(b, s) for s, b in enumerate(controlled)
                                       if rows[b].ctl.control.mode == "token" and not rows[b].waiting]
    if pick:
        token_rows = _token_rows([rows[b] for b, _ in pick], [b for b, _ in pick],
                                 queries[torch.tensor([s for _, s in pick], device=logits.device)], eos)
        kl[token_rows.index] = steer_in_place(scorer, logits, token_rows)
    idx = [i for i, r in enumerate(rows) if not r.waiting and r.ctl.control.mode != "token"
           and r.ctl.sampling.top_p < 1.0 and not r.ctl.pruning]
    if idx:
        sel = torch.tensor(idx, device=logits.device)
        temperature, top_p = _sampling_tensors([rows[i] for i in idx], logits.device)
        base = logits[sel]
        kl[idx] = sampled_kl(base, base, temperature, top_p, truncate=True).float()  # top-p truncation's KL
    return kl


def sample_rows(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
    """Each row's next token (B,) from logits (B, V) at its temperature and top-p, with its own
    generator. Waiting rows (for a selection or a reward call) draw nothing: a seeded answer must
    not depend on how many steps the wait took."""
    sps = [r.ctl.sampling for r in rows]  # the host knows what the device would be asked
    temperature, top_p = _sampling_tensors(rows, logits.device)
    generators = [None if r.waiting else r.generator for r in rows]
    return sample(logits, temperature, top_p, generators, all_greedy=all(s.temperature == 0 for s in sps),
                  truncate=any(s.top_p < 1.0 for s in sps))


def taken_values(scorer: PrefixScorer, controlled: list[int], tokens: torch.Tensor,
                 queries: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Raw member values (H*E,) of each controlled row's taken token (tokens (B,) on the device),
    keyed by batch index: the value of the prefix it completes. They stay on the device until a
    selection or a finished answer reads them."""
    if queries is None:
        return {}
    toks = tokens[torch.tensor(controlled, device=tokens.device)][:, None]  # (Bc, 1)
    vals = scorer.values_at(queries, toks)[:, :, 0].float()  # (Bc, H*E)
    return {b: vals[s] for s, b in enumerate(controlled)}


def _token_rows(rows: list[Row], index: list[int], queries: torch.Tensor, eos: frozenset[int] | set[int]) -> TokenRows:
    ctrls = [r.ctl.control for r in rows]
    return TokenRows(index=index, queries=queries, weights=[c.weights for c in ctrls],
                     strength=[c.strength for c in ctrls], top_k=[c.top_k for c in ctrls],
                     risk=[c.risk for c in ctrls], positions=[r.gen_position for r in rows],
                     temperature=[r.ctl.sampling.temperature for r in rows],
                     top_p=[r.ctl.sampling.top_p for r in rows], keep_tail=[c.tail == "keep" for c in ctrls],
                     plausibility=[c.plausibility for c in ctrls], unheld=tuple(sorted(eos)))


def _sampling_tensors(rows: list[Row], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    temperature = torch.tensor([r.ctl.sampling.temperature for r in rows], device=device)
    top_p = torch.tensor([r.ctl.sampling.top_p for r in rows], device=device)
    return temperature, top_p
