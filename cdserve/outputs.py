"""Typed messages between the engine and its callers (the HTTP layer, the CLI, benchmarks)."""

from __future__ import annotations

import math
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
    token taken, EOS included). combined: sum_h w_h * normalised value. kl: the control.kl
    contract (README, "What control.kl measures"; steering.sampled_kl per token, plus the
    best-of-K bound per selection); +inf for a greedy request whose steering changed a token.
    tokens_generated: tokens the base model sampled for this choice, candidates and EOS included
    (tokens_generated / completion tokens = cost per accepted token). spread: per head, the
    standard deviation of its ensemble's values next to `values` (their mean); None for a scorer
    without an ensemble. With control.risk, `combined` values each head at value + risk * spread.
    """

    mode: str
    values: dict[str, float]
    combined: float
    kl: float = 0.0
    selections: int = 0
    tokens_generated: int = 0
    rewards: dict[str, float] | None = None  # the request's rewards of the kept answer (block/best_of_n)
    spread: dict[str, float] | None = None  # per head: the ensemble's standard deviation (ensemble scorers)

    def to_dict(self) -> dict:
        kl = self.kl if math.isfinite(self.kl) else None  # JSON has no infinity: null
        return {"mode": self.mode, "values": self.values, "combined": self.combined, "kl": kl,
                "selections": self.selections, "tokens_generated": self.tokens_generated,
                **({"rewards": self.rewards} if self.rewards is not None else {}),
                **({"spread": self.spread} if self.spread is not None else {})}


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
    """Engine work, for metrics (the Prometheus metrics in the server consume these;
    cdserve/server/metrics.py has each metric's meaning).

    Usually one engine step. On vLLM some work is reported apart from the step that did it: the
    worker's scorer times arrive in batches (one report per step, `batch_rows` None), as do the
    server-side scorer calls (block / best_of_n selection, final values) and the candidate tokens
    of each block. A report with `batch_rows` None is not a step: it leaves the batch gauge alone.
    """

    batch_rows: int | None = None  # sequences that sampled a token in the step (every candidate counts)
    step_seconds: float = 0.0  # the step's wall time (0: not timed)
    scorer_seconds: float = 0.0  # scorer time of the step, or of one server-side scorer call (0: none)
    prefill_tokens: int = 0  # prompt tokens the base model computed (cache hits excluded)
    candidates_generated: int = 0  # tokens sampled as block / best_of_n candidates
    forked_tokens: int = 0  # vLLM block mode: prompt tokens whose KV was copied, not recomputed


@dataclass(frozen=True)
class EngineLoad:
    waiting: int
    running: int
