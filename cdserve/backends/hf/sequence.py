"""Per-request state of the hf engine: a request has `n` choices; a choice decodes one row
(none/token) or K candidate rows (block/best_of_n) that each occupy a batch row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cdserve.outputs import ChoiceDelta, ControlValues, GenerationRequest, RequestOutput


@dataclass(eq=False)
class Row:
    """One sequence in the batch. `pending` holds tokens not yet accepted by its choice (the
    current block's candidate, or a whole best-of-N answer); none/token rows accept every token
    at once, so their pending stays empty."""

    choice: Choice
    generator: torch.Generator
    last_token: int  # next decode input (the prompt's last token at first)
    pending: list[int] = field(default_factory=list)
    text: str = ""  # decoded committed + pending (after a stop: cut before it)
    finish_reason: str | None = None  # set when this row can generate no more
    waiting: bool = False  # at the end of its block: feeds placeholders until its choice selects
    last_values: torch.Tensor | None = None  # (H,) raw scorer values of the last taken token
    kl: float = 0.0
    sampled: int = 0
    fork_from: Row | None = None  # after a selection: the winner whose cache this row copies

    @property
    def controlled(self) -> bool:
        return self.choice.request.gen.control.mode != "none"

    @property
    def ids(self) -> list[int]:
        return self.choice.committed + self.pending

    @property
    def gen_position(self) -> int:
        """Index of the next generated token (for position-aware normalisation)."""
        return len(self.choice.committed) + len(self.pending)


@dataclass(eq=False)
class Choice:
    request: RequestState
    index: int
    rows: list[Row] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)
    text: str = ""  # text of `committed`
    emitted: int = 0  # characters already sent
    emitted_ids: int = 0  # committed tokens already sent
    finish_reason: str | None = None
    values: torch.Tensor | None = None  # (H,) raw values of the accepted output
    combined: float = 0.0
    kl: float = 0.0
    selections: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def control_values(self, heads: list[str]) -> ControlValues:
        ctrl = self.request.gen.control
        vals = self.values.tolist() if self.values is not None else [float("nan")] * len(heads)
        return ControlValues(mode=ctrl.mode, values=dict(zip(heads, vals)), combined=self.combined,
                             kl=self.kl, selections=self.selections,
                             tokens_generated=sum(r.sampled for r in self.rows))


@dataclass(eq=False)
class RequestState:
    gen: GenerationRequest
    sink: Callable[[RequestOutput | BaseException], None]
    choices: list[Choice] = field(default_factory=list)
    selection_generator: torch.Generator | None = None
    aborted: bool = False

    @property
    def num_rows(self) -> int:
        return self.gen.sampling.n * self.gen.control.candidates

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices)

    def output(self, deltas: list[ChoiceDelta]) -> RequestOutput:
        return RequestOutput(request_id=self.gen.request_id, prompt_tokens=len(self.gen.prompt_token_ids),
                             choices=deltas, finished=self.finished)
