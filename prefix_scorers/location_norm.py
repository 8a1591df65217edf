"""Location-aware normalisers of segment labels (seed 001: the scalar reward normaliser of bandit
RLHF, mean and spread, generalised to functions of where the segment sits in the answer).

A segment's label means different things at different places: the first sentence of an answer
moves VADER's compound score far more than the fifth (the score saturates), and a critic rates
openings differently from endings. So each label is normalised by the mean and standard
deviation of the labels found at the same location in the training rollouts:

    z = (label - mean(loc)) / std(loc)

`loc` is the segment's first response token (`location="token"`, bucketed by `bucket` tokens) or
its index in the answer (`location="index"`, `bucket` segments per bucket); the last bucket takes
every later location. mean and std are piecewise constant in loc: the sample mean and standard
deviation (population, ddof 0) of the labels in each bucket. A bucket with fewer than `min_count`
labels takes the previous bucket's values (the first bucket: the pooled statistics of every label),
and std is floored at `std_floor` x the pooled std (and 1e-6), so a bucket of identical labels does
not divide by zero. Missing labels (None: a critic that did not answer) are left out of the fit and
normalise to None.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

Location = Literal["token", "index"]


@dataclass
class LocationNormalizer:
    location: Location = "token"
    bucket: int = 8  # tokens (or segments) per bucket
    num_buckets: int = 6
    min_count: int = 8
    std_floor: float = 0.1
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    count: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.location not in ("token", "index"):
            raise ValueError(f"location must be 'token' or 'index', got {self.location!r}")
        if self.bucket < 1 or self.num_buckets < 1:
            raise ValueError(f"bucket and num_buckets must be >= 1, got {self.bucket} and {self.num_buckets}")

    def bucket_of(self, index: int, start_token: int) -> int:
        loc = start_token if self.location == "token" else index
        return min(loc // self.bucket, self.num_buckets - 1)

    def fit(self, labels: Iterable[tuple[int, int, float | None]]) -> LocationNormalizer:
        """labels: (segment index, first token, label) triples from the training rollouts."""
        P = self.num_buckets
        s1, s2, n = [0.0] * P, [0.0] * P, [0] * P
        for index, start, value in labels:
            if value is None or not math.isfinite(value):
                continue
            b = self.bucket_of(index, start)
            s1[b] += value
            s2[b] += value * value
            n[b] += 1
        total = sum(n)
        if total == 0:
            raise ValueError("no labels to fit a location normaliser on (every label is missing)")
        pooled_mean = sum(s1) / total
        pooled_std = math.sqrt(max(0.0, sum(s2) / total - pooled_mean**2))
        floor = max(self.std_floor * pooled_std, 1e-6)
        mean, std = [], []
        for b in range(P):
            if n[b] >= self.min_count:
                m = s1[b] / n[b]
                sd = math.sqrt(max(0.0, s2[b] / n[b] - m * m))
            elif b == 0:
                m, sd = pooled_mean, pooled_std
            else:
                m, sd = mean[-1], std[-1]
            mean.append(m)
            std.append(max(sd, floor))
        self.mean, self.std, self.count = mean, std, n
        return self

    def moments(self, index: int, start_token: int) -> tuple[float, float]:
        """(mean, std) of the labels at this location."""
        if not self.mean:
            raise ValueError("this LocationNormalizer is not fitted: call fit() first")
        b = self.bucket_of(index, start_token)
        return self.mean[b], self.std[b]

    def normalize(self, index: int, start_token: int, value: float | None) -> float | None:
        if value is None:
            return None
        m, s = self.moments(index, start_token)
        return (value - m) / s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LocationNormalizer:
        return cls(**d)


def save_normalizers(normalizers: dict[str, LocationNormalizer], path: Path, **meta) -> Path:
    """One JSON file: {"sources": {source: normaliser}, ...meta}."""
    path = Path(path)
    path.write_text(json.dumps({**meta, "sources": {k: v.to_dict() for k, v in normalizers.items()}}, indent=1) + "\n")
    return path


def load_normalizers(path: Path) -> dict[str, LocationNormalizer]:
    data = json.loads(Path(path).read_text())
    return {k: LocationNormalizer.from_dict(v) for k, v in data["sources"].items()}
