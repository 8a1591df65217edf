"""The rows being decoded and their two KV caches, kept in step: `rows` in batch order (row i is
row i of the base model's cache), `scored` the controlled rows in the scorer cache's row order.

Rows join with their prefilled prompt; their fork and leave events (sequence.py) are handed to
both caches (kv_manager.py) by `apply_row_events`, which reorders `rows` and `scored` as the
caches reorder their rows.
"""

from __future__ import annotations

import torch

from cdserve.backends.hf.model_runner import ModelRunner
from cdserve.backends.hf.sequence import RequestState, Row, RowState
from cdserve.backends.scorer_runner import ScorerRunner


class Batch:
    def __init__(self, runner: ModelRunner, scorer: ScorerRunner):
        self.runner, self.scorer = runner, scorer
        self.device = runner.device
        self.rows: list[Row] = []
        self.scored: list[Row] = []
        self.controlled: list[int] = []  # batch index of each scored row (see _reindex)

    def join(self, state: RequestState, rows: list[Row]) -> None:
        """A request's rows join: its prompt is prefilled once (and by the scorer, when controlled)
        and copied into every row."""
        prompt = state.gen.prompt_token_ids
        self.runner.add_rows(self.runner.prefill(prompt), len(rows))
        if state.gen.control.mode != "none":
            self.scorer.add_rows(self.scorer.prefill(prompt), len(rows))
            self.scored.extend(rows)
        self.rows.extend(rows)
        self._reindex()

    # -- one step ---------------------------------------------------------------------------------
    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's next input token and whether it is real (B,) each: a waiting row feeds a
        placeholder that no later token attends to."""
        tokens = torch.tensor([r.last_token for r in self.rows], device=self.device)
        valid = torch.tensor([not r.waiting for r in self.rows], device=self.device)
        return tokens, valid

    def scorer_step(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """The scorer reads the controlled rows' tokens: queries (Bc, H*E, d_e), None if no row is
        controlled."""
        if not self.controlled:
            return None
        sel = torch.tensor(self.controlled, device=self.device)
        return self.scorer.step(tokens[sel], valid[sel])

    def unread_last(self, rows: torch.Tensor) -> None:
        """Both caches forget the token the step read for rows (B,) bool (a block that ends
        before it reads it again)."""
        self.runner.unread_last(rows)
        if self.controlled:
            self.scorer.unread_last(rows[torch.tensor(self.controlled, device=self.device)])

    # -- row events -------------------------------------------------------------------------------
    def apply_row_events(self) -> None:
        """Hand the rows' fork and leave events (sequence.py) to both KV caches: forked rows copy
        their source's cache into their own slot, then the leaving rows' slots are filled by the
        last rows (the batch order changes the same way in `rows` and `scored`)."""
        forks = [(r, r.fork_src) for r in self.rows if r.fork_src is not None]
        if forks:
            position = {id(r): i for i, r in enumerate(self.rows)}
            self.runner.fork([position[id(d)] for d, _ in forks], [position[id(s)] for _, s in forks])
            scored = [(d, s) for d, s in forks if d.controlled]
            if scored:
                slot = {id(r): i for i, r in enumerate(self.scored)}
                self.scorer.fork([slot[id(d)] for d, _ in scored], [slot[id(s)] for _, s in scored])
            for d, _ in forks:
                d.fork_src = None
        leaving = [i for i, r in enumerate(self.rows) if r.state is RowState.FINISHED]
        if leaving:
            order = self.runner.remove(leaving)
            self.rows = [self.rows[j] for j in order]
            gone = [i for i, r in enumerate(self.scored) if r.state is RowState.FINISHED]
            if gone:
                order = self.scorer.remove(gone)
                self.scored = [self.scored[j] for j in order]
        if forks or leaving:
            self._reindex()

    def clear(self) -> None:
        """Every row leaves and both caches start empty (after a failed step, which may have
        stopped half-way through a row operation)."""
        for r in self.rows:
            r.leave()
        self.rows, self.scored, self.controlled = [], [], []
        self.runner.kv.clear()
        self.scorer.kv.clear()

    def _reindex(self) -> None:
        position = {id(r): i for i, r in enumerate(self.rows)}
        self.controlled = [position[id(r)] for r in self.scored]
