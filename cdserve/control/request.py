"""The control request (DESIGN.md), the server's control defaults and limits, and their resolution.

A client sends a partial `ControlRequest`; `resolve_control` fills omitted fields from the
server's `ControlConfig` and checks every value against the scorer's heads and the limits,
raising `InvalidRequestError` that names the parameter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cdserve.errors import InvalidRequestError

Mode = Literal["none", "token", "block", "best_of_n"]
Selection = Literal["argmax", "sample"]
Segment = Literal["fixed", "sentence", "entropy"]
Tail = Literal["drop", "keep"]

# Which explicitly given fields make sense in which mode (weights always do: they define the
# combined value reported with every output).
_FIELDS_BY_MODE: dict[str, set[str]] = {
    "none": {"weights", "risk"},
    "token": {"weights", "strength", "top_k", "tail", "risk", "plausibility"},
    "block": {"weights", "strength", "block_size", "num_candidates", "selection", "rewards", "segment",
              "entropy_threshold", "risk"},
    "best_of_n": {"weights", "strength", "num_candidates", "selection", "rewards", "prune_every",
                  "keep_fraction", "segment", "entropy_threshold", "risk"},
}


class ControlRequest(BaseModel):
    """Per-request steering, sent as `extra_body={"control": {...}}`. Omitted fields take the
    server's defaults (see `GET /v1/scorers`)."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode | None = Field(None, description="none: plain decoding; token: reweight each next-token "
                              "distribution; block: keep the best of num_candidates blocks of "
                              "block_size tokens; best_of_n: keep the best of num_candidates whole answers.")
    weights: dict[str, float] | None = Field(None, description="Weight per scorer head; heads left out weigh 0.")
    strength: float | None = Field(None, description="token: logits + strength * sum_h w_h Q_h. "
                                   "block/best_of_n with selection=sample: softmax(strength * value).")
    top_k: int | None = Field(None, description="token mode: steer among the base model's top_k tokens "
                              "(0: the whole vocabulary).")
    tail: Tail | None = Field(None, description="token mode, top_k > 0: the tokens outside the top_k are "
                              "dropped (drop: never sampled, the controlled-decoding paper's top-k) or kept in "
                              "their base proportions, valued at the top_k's expected value under the base model "
                              "(keep: no KL spent on cutting them off).")
    plausibility: float | None = Field(
        None, description="token mode, 0 to <1: a token whose base probability (temperature 1) is below "
        "plausibility x the most likely token's may be lowered by steering but never raised above the expected "
        "value of a base sample (the model's end-of-sequence tokens excepted): strong steering cannot spell "
        "made-up words out of tokens the base model finds implausible. 0: off.")
    block_size: int | None = Field(None, description="block mode: tokens per block (M).")
    num_candidates: int | None = Field(None, description="block/best_of_n: candidates per selection (K or N).")
    selection: Selection | None = Field(None, description="block/best_of_n: argmax, or sample by "
                                        "softmax(strength * value).")
    rewards: dict[str, float] | None = Field(
        None, description="block/best_of_n: rewards from the server's registry (GET /v1/rewards) to rank "
        "candidates by, with a weight each: a candidate's value is sum_r weight_r * reward_r(answer text so "
        "far) plus the scorer's combined value (send weights {} to rank by the rewards alone).")
    prune_every: int | None = Field(
        None, description="best_of_n: every this many tokens (or at each candidate's next segment end, with "
        "segment sentence/entropy), keep the best keep_fraction of the candidates still running, by the same "
        "value as the final selection (speculative rejection); 0: no pruning.")
    keep_fraction: float | None = Field(None, description="best_of_n with prune_every: fraction of the "
                                        "candidates kept at each pruning point (at least one).")
    segment: Segment | None = Field(
        None, description="block mode: where a block ends (best_of_n: where a pruning point falls, at most "
        "prune_every tokens after the last; no effect without prune_every). fixed: after block_size tokens; sentence: at the "
        "first sentence end (. ! ? or a newline) in the block's text; entropy: before the first token (after "
        "the block's first) whose base-model next-token entropy exceeds entropy_threshold. block_size is the "
        "longest a block may grow in every segmentation.")
    entropy_threshold: float | None = Field(
        None, description="block / pruned best_of_n, used with segment entropy only: the entropy (nats) of the base model's own "
        "next-token distribution (temperature 1, before top-p and steering) above which a block ends before "
        "that token.")


    risk: float | None = Field(
        None, description="-1 to 1: value each head at mean + risk * spread of its ensemble, in steering, "
        "selection and the combined value (negative: avoid what the scorer is unsure of; positive: explore). "
        "No effect on heads without an ensemble (GET /v1/scorers: heads[].uncertainty).")


class ControlConfig(BaseModel):
    """Server-side control defaults and limits. Validated at start-up against the scorer."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field("none", description="Default mode when a request sends no control.")
    weights: dict[str, float] = Field(default_factory=dict,
                                      description="Default head weights (empty: 1.0 on the first head).")
    strength: float = Field(2.0, ge=0, description="Default strength.")
    top_k: int = Field(100, ge=0, description="Default top_k for token mode (100: far less KL than the top 20 "
                       "at about its cost; with tail keep, the whole vocabulary's KL; benchmarks/RESULTS.md).")
    tail: Tail = Field("drop", description="Default for token mode's tokens outside the top_k: drop them, "
                       "or keep them in their base proportions (keep).")
    plausibility: float = Field(0.0, ge=0, lt=1, description="Default plausibility of token mode (0: steering may "
                                "raise any top_k token; benchmarks/RESULTS.md measures 0.05 and 0.1).")
    block_size: int = Field(8, ge=1, description="Default block size M.")
    num_candidates: int = Field(4, ge=1, description="Default K (block) / N (best_of_n).")
    selection: Selection = "argmax"
    segment: Segment = Field("fixed", description="Default block segmentation.")
    entropy_threshold: float = Field(3.0, gt=0, allow_inf_nan=False,
                                     description="Default entropy threshold (nats) of segment entropy.")
    prune_every: int = Field(0, ge=0, description="Default pruning interval of best_of_n (0: off).")
    keep_fraction: float = Field(0.5, gt=0, le=1, description="Default fraction kept at each pruning point.")
    risk: float = Field(0.0, ge=-1, le=1, description="Default risk: heads valued at mean + risk * spread.")
    max_strength: float = Field(100.0, gt=0, description="Largest strength a request may ask for.")
    max_abs_weight: float = Field(100.0, gt=0, description="Largest |weight| a request may ask for.")
    max_top_k: int = Field(1000, ge=1, description="Largest top_k (0, the whole vocabulary, is always allowed).")
    max_block_size: int = Field(64, ge=1, description="Largest block_size.")
    max_num_candidates: int = Field(16, ge=1, description="Largest num_candidates.")
    max_prune_every: int = Field(1024, ge=1, description="Largest prune_every.")

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ControlConfig:
        for name, limit in (("strength", "max_strength"), ("top_k", "max_top_k"),
                            ("block_size", "max_block_size"), ("num_candidates", "max_num_candidates")):
            if getattr(self, name) > getattr(self, limit):
                raise ValueError(f"control default {name}={getattr(self, name)} exceeds "
                                 f"{limit}={getattr(self, limit)}: raise the limit or lower the default")
        return self

    def default_weights(self, heads: list[str]) -> dict[str, float]:
        return dict(self.weights) if self.weights else {heads[0]: 1.0}

    def check_heads(self, heads: list[str]) -> None:
        """Start-up check: default weights must name the scorer's heads."""
        unknown = sorted(set(self.weights) - set(heads))
        if unknown:
            raise ValueError(f"control default weights name unknown heads {unknown}; "
                             f"the scorer has {heads}")


@dataclass(frozen=True)
class ResolvedControl:
    """A fully specified, validated control setting. `weights` follows the scorer's head order."""

    mode: str
    weights: tuple[float, ...]
    strength: float
    top_k: int
    block_size: int
    num_candidates: int
    selection: str
    tail: str = "drop"  # token mode, top_k > 0: "keep" keeps the other tokens in their base proportions
    rewards: tuple[tuple[str, float], ...] = ()  # (reward name, weight) to rank candidates by
    segment: str = "fixed"
    prune_every: int = 0
    keep_fraction: float = 0.5
    entropy_threshold: float = 3.0  # segment "entropy": nats, base model at temperature 1
    risk: float = 0.0  # each head valued at its ensemble's mean + risk * spread
    plausibility: float = 0.0  # token mode: steering.hold_implausible

    @property
    def candidates(self) -> int:
        """Sequences decoded per choice: K for block/best_of_n, 1 otherwise."""
        return self.num_candidates if self.mode in ("block", "best_of_n") else 1

    def extra_args(self) -> dict[str, Any]:
        """A plain dict (for vLLM's SamplingParams.extra_args)."""
        return {"mode": self.mode, "weights": list(self.weights), "strength": self.strength,
                "top_k": self.top_k, "tail": self.tail, "risk": self.risk, "plausibility": self.plausibility}


def parse_control(raw: Any) -> ControlRequest:
    """Parse a raw `control` object, mapping pydantic errors to InvalidRequestError."""
    if raw is None:
        return ControlRequest()
    if isinstance(raw, ControlRequest):
        return raw
    if not isinstance(raw, dict):
        raise InvalidRequestError("control", f"must be an object, got {type(raw).__name__}")
    try:
        return ControlRequest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise InvalidRequestError(f"control.{loc}" if loc else "control", err["msg"]) from None


def _finite(param: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidRequestError(param, f"must be a finite number, got {value}")
    return float(value)


def _within(param: str, value: float, lo: float, hi: float, hint: str = "") -> None:
    if not lo <= value <= hi:
        raise InvalidRequestError(param, f"must be between {lo} and {hi}, got {value}{hint}")


def resolve_control(raw: Any, config: ControlConfig, heads: list[str],
                    rewards: Sequence[str] = ()) -> ResolvedControl:
    """Validate a client's control object against the scorer's heads, the rewards the server can
    call and the server's limits."""
    req = parse_control(raw)
    given = req.model_fields_set - {"mode"}
    mode = req.mode or config.mode
    allowed = _FIELDS_BY_MODE[mode]
    for name in sorted(given):
        if getattr(req, name) is not None and name not in allowed:
            raise InvalidRequestError(f"control.{name}", f"does not apply to mode '{mode}' "
                                      f"(fields for this mode: {sorted(allowed)})")

    weights = req.weights if req.weights is not None else config.default_weights(heads)
    for name, w in weights.items():
        param = f"control.weights.{name}"
        if name not in heads:
            raise InvalidRequestError(param, f"unknown head '{name}'; this scorer has heads {heads}")
        _within(param, _finite(param, w), -config.max_abs_weight, config.max_abs_weight)

    strength = _finite("control.strength", req.strength if req.strength is not None else config.strength)
    _within("control.strength", strength, 0.0, config.max_strength)
    selection = req.selection or config.selection
    if req.strength is not None and mode in ("block", "best_of_n") and selection != "sample":
        raise InvalidRequestError("control.strength", "only applies to block/best_of_n with "
                                  "selection='sample' (argmax ignores it)")

    top_k = req.top_k if req.top_k is not None else config.top_k
    if top_k != 0:
        _within("control.top_k", top_k, 1, config.max_top_k, " (0 means the whole vocabulary)")
    block_size = req.block_size if req.block_size is not None else config.block_size
    _within("control.block_size", block_size, 1, config.max_block_size)
    num_candidates = req.num_candidates if req.num_candidates is not None else config.num_candidates
    _within("control.num_candidates", num_candidates, 1, config.max_num_candidates)

    prune_every = req.prune_every if req.prune_every is not None else config.prune_every
    _within("control.prune_every", prune_every, 0, config.max_prune_every)
    keep_fraction = _finite("control.keep_fraction",
                            req.keep_fraction if req.keep_fraction is not None else config.keep_fraction)
    if not 0 < keep_fraction <= 1:
        raise InvalidRequestError("control.keep_fraction", f"must be in (0, 1], got {keep_fraction}")
    risk = _finite("control.risk", req.risk if req.risk is not None else config.risk)
    _within("control.risk", risk, -1.0, 1.0, " (negative avoids uncertain values, positive seeks them)")
    plausibility = _finite("control.plausibility",
                           req.plausibility if req.plausibility is not None else config.plausibility)
    if not 0 <= plausibility < 1:
        raise InvalidRequestError("control.plausibility", f"must be in [0, 1) (a share of the most likely token's "
                                  f"probability; 0: off), got {plausibility}")
    segment = req.segment or (config.segment if mode == "block" else "fixed")
    if mode == "best_of_n" and prune_every == 0:
        segment = "fixed"  # best_of_n's segment ends are pruning points: none without prune_every
    entropy_threshold = _finite("control.entropy_threshold", req.entropy_threshold
                                if req.entropy_threshold is not None else config.entropy_threshold)
    if not entropy_threshold > 0:
        raise InvalidRequestError("control.entropy_threshold", f"must be > 0 (nats), got {entropy_threshold}")
    for name, w in (req.rewards or {}).items():
        param = f"control.rewards.{name}"
        if name not in rewards:
            raise InvalidRequestError(param, f"unknown reward '{name}'; this server can call {sorted(rewards)} "
                                      "(GET /v1/rewards)")
        _within(param, _finite(param, w), -config.max_abs_weight, config.max_abs_weight)

    return ResolvedControl(mode=mode, weights=tuple(float(weights.get(h, 0.0)) for h in heads),
                           strength=strength, top_k=int(top_k), block_size=int(block_size),
                           num_candidates=int(num_candidates), selection=selection,
                           tail=req.tail or config.tail,
                           rewards=tuple((n, float(w)) for n, w in sorted((req.rewards or {}).items())),
                           segment=segment, entropy_threshold=entropy_threshold,
                           prune_every=int(prune_every) if mode == "best_of_n" else 0, keep_fraction=keep_fraction,
                           risk=risk, plausibility=plausibility)
