"""Segment ratings from a critic language model behind an OpenAI-compatible chat endpoint
(seed 002: a critic LM turns one sparse reward into span-level feedback).

Any server that speaks `POST /v1/chat/completions` works: cdserve itself, vLLM, a hosted API. The
critic reads the prompt, the answer split into numbered segments and the quality a head rewards,
and is asked for one integer rating per segment on `scale` (default 1..10), as JSON.

Critic replies are untrusted text. `parse_ratings` reads, in order: a JSON object
`{"1": 7, "2": 3}` (keys may be "segment 1", "[1]"; values numbers, numeric strings or objects
with "rating"/"score"), a JSON list with exactly one entry per segment, or lines like `1: 7`,
`[2] = 3`, `Segment 3 - 8/10`. A rating that is missing, not a number, out of the scale, or given
twice with different values becomes None (a missing label); so does every rating of a reply that
matches none of the forms, of a list with the wrong length, of a reply that only copies the
prompt's example ratings, and of a request that failed.
Nothing here raises on a bad reply.

Requests are bounded: `timeout` seconds each, `retries` retries on connection errors, timeouts,
429 and 5xx (the `openai` client's own retry with backoff), at most `concurrency` in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a strict, careful critic of text quality. You answer with JSON only."
USER_TEMPLATE = """Rate each numbered segment of the answer below for this quality: {quality}
Use whole numbers from {lo} (not at all) to {hi} (very much). Judge each segment on its own.

Question: {prompt}

Answer, in {k} segments:
{segments}

Reply with one JSON object mapping every segment number to its rating, e.g. {example}"""


@dataclass(frozen=True)
class CriticConfig:
    """Where the critic is and how hard to try. `model` None: the first of the server's /v1/models."""

    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str | None = None
    api_key: str = "EMPTY"
    scale: tuple[float, float] = (1.0, 10.0)
    timeout: float = 60.0  # seconds per request
    retries: int = 2  # retries per request after the first try (openai's backoff)
    concurrency: int = 4  # requests in flight
    max_tokens: int = 200
    temperature: float = 0.0
    extra_body: dict = field(default_factory=dict)  # e.g. {"control": {"mode": "none"}} for cdserve

    def __post_init__(self):
        lo, hi = self.scale
        if not lo < hi:
            raise ValueError(f"critic scale must be (low, high) with low < high, got {self.scale}")
        if self.timeout <= 0 or self.retries < 0 or self.concurrency < 1:
            raise ValueError(f"critic timeout must be > 0, retries >= 0 and concurrency >= 1; got "
                             f"timeout={self.timeout}, retries={self.retries}, concurrency={self.concurrency}")


def _bounds(scale: tuple[float, float]) -> tuple[float, float]:
    """The scale's ends as the prompt prints them (whole numbers without a decimal point)."""
    lo, hi = (int(v) if float(v).is_integer() else v for v in scale)
    return lo, hi


def _example(k: int, scale: tuple[float, float]) -> list[float]:
    """The ratings the prompt shows as its example of the reply's form (up to 3 segments)."""
    lo, hi = _bounds(scale)
    return [lo if i % 2 else hi for i in range(min(k, 3))]


def copies_example(ratings: list[float | None], scale: tuple[float, float]) -> bool:
    """Whether a reply's ratings are the prompt's example and nothing else (2+ of them): a critic
    too weak to rate copies it (SmolLM2-135M did, every time; benchmarks/RESULTS.md)."""
    example = _example(len(ratings), scale)
    return (len(example) >= 2 and ratings[:len(example)] == example
            and all(r is None for r in ratings[len(example):]))


def build_messages(prompt: str, segments: list[str], quality: str, scale: tuple[float, float]) -> list[dict]:
    lo, hi = _bounds(scale)
    numbered = "\n".join(f"[{i + 1}] {s.strip()}" for i, s in enumerate(segments))
    example = json.dumps({str(i + 1): v for i, v in enumerate(_example(len(segments), scale))})
    user = USER_TEMPLATE.format(quality=quality, lo=lo, hi=hi, prompt=prompt.strip(), k=len(segments),
                                segments=numbered, example=example)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_INDEX = re.compile(r"\d+")
_LINE = re.compile(r"""^\W*(?:segment\s*)?\[?(\d+)\]?["*]*\s*(?:[:=)\-–]|\.\s)\s*\**\s*(-?\d+(?:\.\d+)?)""",
                   re.IGNORECASE | re.MULTILINE)


def _number(v) -> float | None:
    if isinstance(v, dict):
        v = next((v[k] for k in ("rating", "score", "value") if k in v), None)
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+)?\s*", v)
        return float(m.group(1)) if m else None
    return None


def _json_value(text: str, k: int):
    """The first JSON object in text, else its first list of k entries (code fences and prose
    around them allowed), or None. Other lists are skipped: a critic that quotes the segments'
    markers ("[1] It was great") writes one-entry lists before its ratings."""
    decoder = json.JSONDecoder()
    first_list = None
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                value = decoder.raw_decode(text, i)[0]
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
            if first_list is None and isinstance(value, list) and len(value) == k:
                first_list = value
    return first_list


def parse_ratings(reply: str | None, k: int, scale: tuple[float, float]) -> list[float | None]:
    """One rating per segment (None: missing), from a critic's reply; never raises."""
    lo, hi = scale
    found: dict[int, list[float | None]] = {}

    def add(index: int, value: float | None) -> None:
        if 1 <= index <= k:
            found.setdefault(index, []).append(value)

    value = _json_value(reply or "", k)
    if isinstance(value, dict):
        for key, v in value.items():
            m = _INDEX.search(str(key))
            if m:
                add(int(m.group()), _number(v))
    elif isinstance(value, list) and len(value) == k:
        for i, v in enumerate(value):
            add(i + 1, _number(v))
    elif value is None:
        for m in _LINE.finditer(reply or ""):
            add(int(m.group(1)), float(m.group(2)))
    out: list[float | None] = []
    for i in range(1, k + 1):
        vals = found.get(i, [])
        v = vals[0] if vals and all(x == vals[0] for x in vals) else None
        out.append(v if v is not None and math.isfinite(v) and lo <= v <= hi else None)
    return out


@dataclass
class CriticStats:
    requests: int = 0
    failed: int = 0  # transport errors or timeouts after every retry
    ratings: int = 0
    missing: int = 0
    copied_example: int = 0  # replies whose ratings were the prompt's example: dropped (missing)
    errors: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        share = self.missing / max(1, self.ratings + self.missing)
        return (f"critic: {self.requests} requests, {self.failed} failed, {self.ratings} ratings, "
                f"{self.missing} missing ({share:.0%})"
                + (f", {self.copied_example} replies copied the prompt's example (dropped)" if self.copied_example else "")
                + (f"; errors {dict(self.errors)!r}" if self.errors else ""))


class Critic:
    """Rates segments through an OpenAI-compatible chat endpoint."""

    def __init__(self, cfg: CriticConfig):
        self.cfg = cfg
        self.stats = CriticStats()

    def _client(self):
        import openai

        return openai.AsyncOpenAI(base_url=self.cfg.base_url, api_key=self.cfg.api_key, timeout=self.cfg.timeout,
                                  max_retries=self.cfg.retries)

    async def model_name(self, client) -> str:
        if self.cfg.model:
            return self.cfg.model
        import openai

        try:
            models = await client.models.list()
        except openai.APIError as e:
            raise ValueError(f"cannot list the critic's models at {self.cfg.base_url} ({e}): check the URL, "
                             "or pass --critic-model") from e
        if not models.data:
            raise ValueError(f"the critic server at {self.cfg.base_url} lists no models: pass --critic-model")
        return models.data[0].id

    async def _rate(self, client, sem: asyncio.Semaphore, model: str, prompt: str, segments: list[str],
                    quality: str) -> tuple[list[float | None], str | None]:
        import openai

        if not segments:
            return [], None
        async with sem:
            self.stats.requests += 1
            try:
                resp = await client.chat.completions.create(
                    model=model, messages=build_messages(prompt, segments, quality, self.cfg.scale),
                    max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                    extra_body=self.cfg.extra_body or None)
                reply = resp.choices[0].message.content if resp.choices else None
            # a failed request, or a body that is not a chat completion (non-JSON, wrong shape)
            except (openai.APIError, asyncio.TimeoutError, ValueError, TypeError, AttributeError, KeyError,
                    IndexError) as e:
                self.stats.failed += 1
                self.stats.errors[type(e).__name__] += 1
                self.stats.missing += len(segments)
                log.warning("critic request failed after %d retries: %s", self.cfg.retries, e)
                return [None] * len(segments), None
        ratings = parse_ratings(reply, len(segments), self.cfg.scale)
        if copies_example(ratings, self.cfg.scale):
            self.stats.copied_example += 1
            ratings = [None] * len(segments)
        self.stats.ratings += sum(r is not None for r in ratings)
        self.stats.missing += sum(r is None for r in ratings)
        return ratings, reply

    async def rate_many(self, items: list[tuple[str, list[str], str]]) -> list[tuple[list[float | None], str | None]]:
        """items: (prompt, segment texts, quality); -> (ratings, raw reply or None) per item, in order."""
        async with self._client() as client:
            model = await self.model_name(client)
            sem = asyncio.Semaphore(self.cfg.concurrency)
            return list(await asyncio.gather(*(self._rate(client, sem, model, *it) for it in items)))

    def rate(self, items: list[tuple[str, list[str], str]]) -> list[tuple[list[float | None], str | None]]:
        """Synchronous `rate_many` (runs its own event loop)."""
        return asyncio.run(self.rate_many(items))
