"""Sampling parameters (the usual OpenAI ones) and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cdserve.errors import InvalidRequestError

MAX_STOP_STRINGS = 4  # OpenAI's limit


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_tokens_limit: int, max_n: int) -> SamplingParams:
        """Raise InvalidRequestError naming the first bad parameter; returns self."""
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise InvalidRequestError("max_tokens", f"must be between 1 and {max_tokens_limit} "
                                      f"(the server's limit), got {self.max_tokens}")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError("temperature", f"must be between 0 and 2, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 1 <= self.n <= max_n:
            raise InvalidRequestError("n", f"must be between 1 and {max_n}, got {self.n}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise InvalidRequestError("seed", f"must fit in 64 bits, got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must not be empty")
        return self
