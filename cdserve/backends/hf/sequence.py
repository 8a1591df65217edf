"""Per-request state of the hf engine: a request has `n` choices; a choice (its ChoiceController
owns the answer, the candidates and the checks) decodes one row (none/token) or K candidate rows
(block/best_of_n), each occupying a batch row.

A row is a small state machine:

    RUNNING --done()--> WAITING --fork(src) / resume()--> RUNNING
       \\________________ leave() ________________/--> FINISHED

`fork(src)` and `leave()` are also events for the KV caches: a fork means "this row's cache
becomes a copy of src's", a leave "this row's slot is free". The engine hands them to the KV
manager after each step (Batch.apply_row_events, batch.py) and clears them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from cdserve.control.choice import ChoiceController
from cdserve.outputs import ChoiceDelta, GenerationRequest, RequestOutput


class RowState(enum.Enum):
    RUNNING = "running"  # samples a token every step
    WAITING = "waiting"  # its candidate is done: feeds placeholders until its choice selects
    FINISHED = "finished"  # left the batch (or is about to, at the next row-event pass)


@dataclass(eq=False)
class Row:
    """One sequence in the batch: candidate `k` of its choice."""

    choice: Choice
    k: int
    generator: torch.Generator
    last_token: int  # next decode input (the prompt's last token at first)
    state: RowState = RowState.RUNNING
    last_values: torch.Tensor | None = None  # (H*E,) raw scorer member values of the last taken token
    fork_src: Row | None = None  # pending fork event: the row whose cache this one copies

    # -- transitions -------------------------------------------------------------------------------
    def done(self) -> None:
        """Its candidate is complete (or its block ended early): wait for the choice to select."""
        self._check(RowState.RUNNING, "done")
        self.state = RowState.WAITING

    def resume(self) -> None:
        """Go on from its own cache (a surviving candidate of pruned best-of-N)."""
        self._check(RowState.WAITING, "resume")
        self.state = RowState.RUNNING

    def fork(self, src: Row) -> None:
        """Go on from src's cache and last token (the block winner): an event for the KV caches."""
        self._check(RowState.WAITING, "fork")
        self.state, self.last_token = RowState.RUNNING, src.last_token
        if src is not self:
            self.fork_src = src

    def leave(self) -> None:
        """Leave the batch (finished, pruned, aborted or failed): an event for the KV caches."""
        self.state, self.fork_src = RowState.FINISHED, None

    def _check(self, expected: RowState, event: str) -> None:
        if self.state is not expected:
            raise RuntimeError(f"row {self.k} of request {self.choice.request.gen.request_id}: {event}() in state "
                               f"{self.state.value}, expected {expected.value}")

    # -- reads -------------------------------------------------------------------------------------
    @property
    def waiting(self) -> bool:
        return self.state is RowState.WAITING

    @property
    def ctl(self) -> ChoiceController:
        return self.choice.ctl

    @property
    def controlled(self) -> bool:
        return self.ctl.control.mode != "none"

    @property
    def gen_position(self) -> int:
        """Index in the answer of the token this row generates next."""
        return len(self.ctl.accepted) + len(self.ctl.candidates[self.k].tokens)


@dataclass(eq=False)
class Choice:
    request: RequestState
    ctl: ChoiceController
    rows: list[Row] = field(default_factory=list)
    rewards: dict[str, Future] | None = None  # the request's rewards on this block's candidates, running


@dataclass(eq=False)
class RequestState:
    gen: GenerationRequest
    sink: Callable[[RequestOutput | BaseException], None]
    choices: list[Choice] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.gen.sampling.n * self.gen.control.candidates

    @property
    def finished(self) -> bool:
        return all(c.ctl.finished for c in self.choices)

    def output(self, deltas: list[ChoiceDelta]) -> RequestOutput:
        return RequestOutput(request_id=self.gen.request_id, prompt_tokens=len(self.gen.prompt_token_ids),
                             choices=deltas, finished=self.finished)
