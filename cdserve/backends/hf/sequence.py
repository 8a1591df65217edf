"""Per-request state of the hf engine: a request has `n` choices; a choice (its ChoiceController
owns the answer, the candidates and the checks) decodes one row (none/token) or K candidate rows
(block/best_of_n), each occupying a batch row."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from cdserve.control.choice import ChoiceController
from cdserve.outputs import ChoiceDelta, GenerationRequest, RequestOutput


@dataclass(eq=False)
class Row:
    """One sequence in the batch: candidate `k` of its choice."""

    choice: Choice
    k: int
    generator: torch.Generator
    last_token: int  # next decode input (the prompt's last token at first)
    waiting: bool = False  # its candidate is done: feeds placeholders until its choice selects
    last_values: torch.Tensor | None = None  # (H*E,) raw scorer member values of the last taken token
    fork_from: Row | None = None  # after a selection: the winner whose cache this row copies

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
