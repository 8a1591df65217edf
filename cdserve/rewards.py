"""The reward service: the true rewards a request may rank candidates by, scored in batches, off
the caller's thread, with a time limit.

Two kinds of reward: the Python rewards of prefix_scorers' registry (the built-ins, and any a
module named in `rewards.modules` or `PREFIX_SCORERS_REWARDS` registers), and HTTP reward models
configured at start-up (the registry's protocol: POST `{"texts": [...]}`, answer
`{"scores": [...]}`, one number per text, in order).

    service = RewardService(config.rewards)
    future = service.submit("vader_compound", ["a text", "another"])  # thread-safe, returns at once
    scores = future.result()  # [0.0, 0.0]; or raises RewardError naming the reward and the problem

Texts that concurrent callers submit for the same reward within `batch_wait_ms` go out in one
underlying call (at most `max_batch` texts each). Calls run on a small thread pool; a clock thread
starts the batches and fails every call still running `timeout_s` after it started (its late
answer is dropped). A call's failure fails only the futures whose texts were in it.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

UNBOUNDED = (-math.inf, math.inf)
_RANGE_SLACK = 1e-6  # float noise tolerated at a declared range's ends (as the registry does)

Listener = Callable[[str, int, float, bool], None]  # (reward, texts, seconds, ok) per underlying call


class RewardError(RuntimeError):
    """A reward could not be used: unknown, failed, too slow, or answered something invalid.
    `reward` names it; the message says what failed and what to do, and may reach the client, so
    an HTTP reward's URL and answer go in `detail`, for the server's log only."""

    def __init__(self, reward: str, message: str, detail: str = ""):
        super().__init__(message)
        self.reward, self.detail = reward, detail


class RewardConfig(BaseModel):
    """Which rewards requests may name, and how they are called."""

    model_config = ConfigDict(extra="forbid")

    python: list[str] | None = Field(None, description="Registered Python rewards requests may "
                                     "name, a JSON list (default: every registered one, the built-ins included).")
    modules: list[str] = Field(default_factory=list, description="Python modules to import first, so "
                               "their register_reward calls run (PREFIX_SCORERS_REWARDS is read too).")
    http: dict[str, str] = Field(default_factory=dict, description="HTTP reward models as JSON "
                                 "{name: URL}; POST {\"texts\": [...]} answers {\"scores\": [...]}.")
    http_range: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="Declared range of HTTP rewards' scores as JSON {name: "
        "[min, max]} (default: unbounded); a score outside it fails the call.")
    timeout_s: float = Field(10.0, gt=0, description="Seconds an underlying call may take; past it, "
                             "that call's requests fail.")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long a call waits for other requests' "
                                 "texts for the same reward.")
    max_batch: int = Field(256, ge=1, description="Most texts in one underlying call.")
    threads: int = Field(2, ge=1, description="Reward calls running at once.")

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        for name, url in self.http.items():
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"http reward '{name}': URL {url!r} must start with http:// or https://")
        if extra := sorted(set(self.http_range) - set(self.http)):
            raise ValueError(f"http_range names {extra}, which are not HTTP rewards {sorted(self.http)}")
        for name, (lo, hi) in self.http_range.items():
            if math.isnan(lo) or math.isnan(hi) or lo > hi:
                raise ValueError(f"http_range of '{name}' is [{lo}, {hi}]; give [min, max] with min <= max")
        python_rewards(self)  # unknown Python names and name clashes stop start-up here
        return self


def python_rewards(config: RewardConfig) -> dict:
    """The registry's rewards `config` lets requests name: {name: prefix_scorers Reward}."""
    from prefix_scorers.rewards import import_reward_modules, list_rewards

    try:
        import_reward_modules(config.modules)
    except ImportError as e:
        raise ValueError(f"cannot import a reward module ({e}); check rewards.modules and "
                         "PREFIX_SCORERS_REWARDS") from None
    registered = {r.name: r for r in list_rewards()}
    if clash := sorted(set(config.http) & set(registered)):
        raise ValueError(f"HTTP rewards {clash} have the names of registered Python rewards; rename them")
    if config.python is None:
        return registered
    if unknown := sorted(set(config.python) - set(registered)):
        raise ValueError(f"unknown Python rewards {unknown}: registered rewards are {sorted(registered)} "
                         "(add yours with prefix_scorers.rewards.register_reward in a module named in "
                         "rewards.modules)")
    return {name: registered[name] for name in config.python}


@dataclass(frozen=True)
class _Source:
    """One reward the service can call."""

    name: str
    kind: Literal["python", "http"]
    description: str
    range: tuple[float, float]
    score: Callable[[list[str]], Any]  # raw scores, checked by _validate
    what: str  # how messages name it
    url: str = ""  # an HTTP reward's, for the log


@dataclass(eq=False)
class _Job:
    """One `submit`: its texts may be spread over several calls (max_batch)."""

    texts: list[str]
    future: Future
    scores: list[float | None] = field(init=False)
    missing: int = field(init=False)  # texts not scored yet

    def __post_init__(self) -> None:
        self.scores, self.missing = [None] * len(self.texts), len(self.texts)


@dataclass(eq=False)
class _Call:
    """One underlying call of a reward: (job, index of the text in the job) per text."""

    source: _Source
    items: list[tuple[_Job, int]]
    started: float
    deadline: float


class RewardService:
    """Scores texts with the configured rewards; see the module docstring."""

    def __init__(self, config: RewardConfig):
        self.config = config
        self._http = httpx.Client(timeout=config.timeout_s) if config.http else None
        self._sources = {r.name: _Source(r.name, "python", r.description, tuple(r.reward_range), r.fn,
                                         f"Python reward '{r.name}'")
                         for r in python_rewards(config).values()}
        for name, url in config.http.items():
            self._sources[name] = _Source(name, "http", "HTTP reward model (configured at start-up)",
                                          tuple(config.http_range.get(name, UNBOUNDED)),
                                          self._http_scorer(name, url), f"HTTP reward '{name}'", url)
        self._pool = ThreadPoolExecutor(config.threads, thread_name_prefix="cdserve-reward")
        self._listeners: list[Listener] = []
        self._cond = threading.Condition()
        self._pending: dict[str, list[_Job]] = {}  # per reward: jobs waiting to go out together
        self._due: dict[str, float] = {}  # per reward: when its pending jobs go out
        self._running: set[_Call] = set()
        self._closed = False
        self._clock = threading.Thread(target=self._tick, name="cdserve-reward-clock", daemon=True)
        self._clock.start()

    def names(self) -> list[str]:
        return sorted(self._sources)

    def describe(self) -> list[dict]:
        """Per reward: name, description, range ([min, max], None where unbounded), kind."""
        return [{"name": s.name, "description": s.description, "kind": s.kind,
                 "range": [b if math.isfinite(b) else None for b in s.range]}
                for s in sorted(self._sources.values(), key=lambda s: s.name)]

    def add_listener(self, fn: Listener) -> None:
        """`fn(reward, texts, seconds, ok)` after each underlying call (a timed-out one: ok False)."""
        self._listeners.append(fn)

    def submit(self, name: str, texts: Sequence[str]) -> Future:
        """Score `texts` with reward `name`: a Future of one float per text, in order, or of a
        RewardError. An unknown name raises RewardError at once."""
        if name not in self._sources:
            raise RewardError(name, f"unknown reward '{name}': this server can call {self.names()} "
                              "(GET /v1/rewards)")
        job = _Job(list(texts), Future())
        if not job.texts:
            job.future.set_result([])
            return job.future
        with self._cond:
            if self._closed:
                raise RewardError(name, "the reward service is shut down")
            pending = self._pending.setdefault(name, [])
            pending.append(job)
            full = sum(len(j.texts) for j in pending) >= self.config.max_batch
            self._due[name] = time.monotonic() if full else \
                self._due.get(name, time.monotonic() + self.config.batch_wait_ms / 1000)
            self._cond.notify()
        return job.future

    def close(self) -> None:
        """Stop: what is pending or running fails with RewardError; running calls are abandoned."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            jobs = [(name, job) for name, js in self._pending.items() for job in js]
            jobs += [(call.source.name, job) for call in self._running for job, _ in call.items]
            self._pending.clear(), self._due.clear(), self._running.clear()
            self._cond.notify()
        for name, job in jobs:
            _settle(job.future, error=RewardError(name, "the reward service shut down before the call ended"))
        self._clock.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._http is not None:
            self._http.close()

    # --- the clock thread: start batches that waited long enough, fail calls past their deadline ---

    def _tick(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                due = [name for name, t in self._due.items() if t <= now]
                batches = [(self._sources[name], self._pending.pop(name)) for name in due]
                for name in due:
                    del self._due[name]
                late = [call for call in self._running if call.deadline <= now]
                if not batches and not late:
                    wake = min([*self._due.values(), *(c.deadline for c in self._running)], default=None)
                    self._cond.wait(None if wake is None else wake - now)
                    continue
                calls = [self._start(source, jobs, now) for source, jobs in batches]
            for call in itertools.chain.from_iterable(calls):
                self._pool.submit(self._run, call)
            for call in late:
                self._end(call, error=RewardError(
                    call.source.name, f"{call.source.what} did not answer within {self.config.timeout_s:g} s "
                    "(rewards.timeout_s); check that it is up and fast enough for that many texts, or raise "
                    "the timeout"))

    def _start(self, source: _Source, jobs: list[_Job], now: float) -> list[_Call]:
        """Split a reward's pending texts into calls of at most max_batch (holding the lock)."""
        items = [(job, i) for job in jobs for i in range(len(job.texts))]
        step = self.config.max_batch
        calls = [_Call(source, items[k:k + step], now, now + self.config.timeout_s)
                 for k in range(0, len(items), step)]
        self._running.update(calls)
        return calls

    # --- a pool thread: one underlying call ---

    def _run(self, call: _Call) -> None:
        source = call.source
        texts = [job.texts[i] for job, i in call.items]
        try:
            scores = _validate(source, texts, source.score(texts))
        except RewardError as e:
            return self._end(call, error=e)
        except Exception as e:  # noqa: BLE001  (a user's reward raised: that call fails, nothing else)
            return self._end(call, error=RewardError(source.name, f"{source.what} raised "
                                                     f"{type(e).__name__}: {e}"))
        self._end(call, scores=scores)

    def _end(self, call: _Call, scores: list[float] | None = None, error: RewardError | None = None) -> None:
        """Hand a call's scores (or error) to its jobs; a call already ended (timed out) is ignored."""
        done: list[_Job] = []
        with self._cond:
            if call not in self._running:
                return
            self._running.discard(call)
            if scores is not None:
                for (job, i), s in zip(call.items, scores):
                    job.scores[i] = s
                    job.missing -= 1
                    if job.missing == 0:
                        done.append(job)
        seconds = time.monotonic() - call.started
        for fn in self._listeners:
            try:
                fn(call.source.name, len(call.items), seconds, error is None)
            except Exception:  # metrics must not break scoring
                log.exception("reward listener failed")
        if error is not None:
            log.warning("%s [%s]", error, "; ".join(filter(None, (call.source.url, error.detail))))
            for job in {id(job): job for job, _ in call.items}.values():
                _settle(job.future, error=error)
        for job in done:
            _settle(job.future, result=job.scores)

    def _http_scorer(self, name: str, url: str) -> Callable[[list[str]], Any]:
        what = f"HTTP reward '{name}'"

        def score(texts: list[str]) -> Any:
            try:
                resp = self._http.post(url, json={"texts": texts})
            except httpx.TimeoutException:
                raise RewardError(name, f"{what} did not answer within {self.config.timeout_s:g} s "
                                  "(rewards.timeout_s); check that it is up, or raise the timeout") from None
            except httpx.HTTPError as e:
                raise RewardError(name, f"{what} could not be reached ({type(e).__name__}); check that it "
                                  "is running at its configured URL", f"{e}") from None
            answer = f"answer: {resp.text[:200]!r}"
            if resp.status_code != 200:
                raise RewardError(name, f"{what} answered HTTP {resp.status_code}; see the reward model's "
                                  "log", answer)
            try:
                body = resp.json()
            except ValueError:
                raise RewardError(name, f"{what} answered something that is not JSON; it must answer "
                                  '{"scores": [one number per text]}', answer) from None
            if not isinstance(body, dict) or not isinstance(body.get("scores"), list):
                raise RewardError(name, f"{what} answered JSON without a 'scores' list; it must answer "
                                  '{"scores": [one number per text]}', answer)
            return body["scores"]

        return score


def _validate(source: _Source, texts: list[str], scores: Any) -> list[float]:
    """One finite number per text, within the declared range; else RewardError saying which."""
    what = source.what
    if isinstance(scores, (str, bytes, dict)) or not hasattr(scores, "__len__"):
        raise RewardError(source.name, f"{what} returned {str(scores)[:100]!r}, not a list of numbers")
    if len(scores) != len(texts):
        raise RewardError(source.name, f"{what} returned {len(scores)} scores for {len(texts)} texts; it "
                          "must return one per text, in order")
    lo, hi = source.range
    out = []
    for i, s in enumerate(scores):
        where = f"for text {i} ({texts[i][:40]!r})"
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise RewardError(source.name, f"{what} returned {s!r} {where}: not a number")
        s = float(s)
        if not math.isfinite(s):
            raise RewardError(source.name, f"{what} returned {s} {where}: scores must be finite")
        if not lo - _RANGE_SLACK <= s <= hi + _RANGE_SLACK:
            raise RewardError(source.name, f"{what} returned {s} {where}, outside its declared range "
                              f"[{lo:g}, {hi:g}]; fix the reward or its declared range")
        out.append(s)
    return out


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a future unless it already is (failed by another of its calls, or cancelled)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
