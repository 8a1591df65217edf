"""The reward registry: name -> a function that scores a batch of texts.

A reward maps a list of response texts to a list of floats (one per text) in a documented range.
The trainer, the labeller and the quality benchmark look rewards up here by name, so a user adds
a reward without touching them:

    from prefix_scorers.rewards import register_reward

    @register_reward("polite", description="Says please.", reward_range=(0.0, 1.0))
    def polite(texts):
        return [float("please" in t.lower()) for t in texts]

or, for a reward served elsewhere (a classifier behind HTTP):

    register_http_reward("toxicity_api", "http://localhost:9000/score", reward_range=(0.0, 1.0))

Modules named in the `PREFIX_SCORERS_REWARDS` environment variable (comma-separated, e.g.
`mypkg.rewards`) and `--reward-module` CLI flags are imported before a lookup, so their
`register_reward` calls run.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RewardFn = Callable[[Sequence[str]], Sequence[float]]


@dataclass(frozen=True)
class Reward:
    """A named reward: `fn(texts) -> scores`, each score within `reward_range`."""

    name: str
    fn: RewardFn
    description: str = ""
    reward_range: tuple[float, float] = (0.0, 1.0)

    def __call__(self, texts: Sequence[str]) -> list[float]:
        scores = [float(s) for s in self.fn(list(texts))]
        if len(scores) != len(texts):
            raise ValueError(f"reward '{self.name}' returned {len(scores)} scores for {len(texts)} texts")
        lo, hi = self.reward_range
        for text, s in zip(texts, scores):
            if not math.isfinite(s) or not lo - 1e-6 <= s <= hi + 1e-6:
                raise ValueError(f"reward '{self.name}' returned {s} for {text[:60]!r}, outside its "
                                 f"declared range [{lo}, {hi}]")
        return scores


_REGISTRY: dict[str, Reward] = {}


def register_reward(name: str, fn: RewardFn | None = None, *, description: str = "",
                    reward_range: tuple[float, float] = (0.0, 1.0), replace: bool = False):
    """Register `fn` under `name`; usable as a decorator when `fn` is omitted."""

    def add(f: RewardFn) -> RewardFn:
        if name in _REGISTRY and not replace:
            raise ValueError(f"a reward named '{name}' is already registered (pass replace=True)")
        _REGISTRY[name] = Reward(name, f, description, tuple(reward_range))  # type: ignore[arg-type]
        return f

    return add(fn) if fn is not None else add


def register_http_reward(name: str, url: str, *, description: str = "",
                         reward_range: tuple[float, float] = (0.0, 1.0), timeout: float = 30.0,
                         batch_size: int = 64, replace: bool = False) -> None:
    """Register a reward served over HTTP.

    Protocol: POST `url` with JSON `{"texts": [...]}`; the endpoint answers `{"scores": [...]}`
    with one number per text, in the same order.
    """

    def score(texts: Sequence[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(texts), batch_size):
            chunk = list(texts[i:i + batch_size])
            req = urllib.request.Request(url, data=json.dumps({"texts": chunk}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                scores = json.loads(resp.read())["scores"]
            if len(scores) != len(chunk):
                raise ValueError(f"reward endpoint {url} returned {len(scores)} scores for {len(chunk)} texts")
            out.extend(float(s) for s in scores)
        return out

    register_reward(name, score, description=description or f"HTTP reward at {url}",
                    reward_range=reward_range, replace=replace)


def import_reward_modules(modules: Sequence[str] = ()) -> None:
    """Import user modules that register rewards (and those named in PREFIX_SCORERS_REWARDS)."""
    names = [m for m in os.environ.get("PREFIX_SCORERS_REWARDS", "").split(",") if m.strip()]
    for module in [*names, *modules]:
        importlib.import_module(module.strip())


def get_reward(name: str) -> Reward:
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward '{name}': registered rewards are {sorted(_REGISTRY)}; "
                       "register yours with prefix_scorers.rewards.register_reward")
    return _REGISTRY[name]


def list_rewards() -> list[Reward]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
