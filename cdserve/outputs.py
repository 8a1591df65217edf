"""Typed messages between the engine and its callers (the HTTP layer, the CLI, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cdserve.control.request import ResolvedControl
from cdserve.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    control: ResolvedControl


@dataclass
class ControlValues:
    """What the steering did, reported with each finished choice.

    values: the scorer's value of the final output per head, in reward units (read at the last
    position, at the token taken). combined: sum_h w_h * normalised value. kl: token mode, the
    exact sum over steps of KL(steered || base); block/best_of_n, the paper's bound
    (log K - (K-1)/K per selection). tokens_generated: tokens the base model sampled for this
    choice, candidates included (tokens_generated / completion tokens = cost per accepted token).
    """

    mode: str
    values: dict[str, float]
    combined: float
    kl: float = 0.0
    selections: int = 0
    tokens_generated: int = 0

    def to_dict(self) -> dict:
        return {"mode": self.mode, "values": self.values, "combined": self.combined, "kl": self.kl,
                "selections": self.selections, "tokens_generated": self.tokens_generated}


@dataclass
class ChoiceDelta:
    """New output of one choice since the previous RequestOutput."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    control: ControlValues | None = None  # set when the choice finishes


@dataclass
class RequestOutput:
    request_id: str
    prompt_tokens: int
    choices: list[ChoiceDelta] = field(default_factory=list)
    finished: bool = False


@dataclass(frozen=True)
class StepStats:
    """One engine step, for metrics (the Prometheus logger in the server consumes these)."""

    batch_rows: int
    step_seconds: float
    scorer_seconds: float
    prefill_tokens: int
    candidates_generated: int  # tokens sampled this step in block / best_of_n rows
    forked_tokens: int = 0  # vLLM block mode: prompt tokens whose KV was copied, not recomputed


@dataclass(frozen=True)
class EngineLoad:
    waiting: int
    running: int
