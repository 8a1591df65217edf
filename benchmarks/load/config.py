"""The load benchmark's config: which servers, which workloads, which runs, which comparisons.

A TOML file (configs/*.toml) is read into these dataclasses and checked once, at the edge: every
error names the field and the fix. Sizes are bounded (requests per run, seconds per run), so a
config cannot start an unbounded load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

SERVER_KINDS = ("cdserve", "vllm", "args", "best_of_n")
METRICS = ("request_throughput", "output_throughput", "median_ttft_ms", "median_tpot_ms",
           "median_itl_ms", "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms")
MAX_PROMPTS_PER_RUN = 2000
MAX_CONCURRENCY = 256


class ConfigError(ValueError):
    pass


@dataclass
class BenchConfig:
    """The workload every run shares (the tool's flags)."""

    prompts: str = "prefix_scorers/data/prompts_eval.jsonl"  # JSONL with a "prompt" field
    tokenizer: str = "smollm2"  # 'smollm2' or a model folder: counts prompt tokens client-side
    num_prompts: int = 16  # requests per run (per concurrency level)
    prompts_per_concurrency: int = 0  # > 0: at least this many requests per stream (keeps c=64 busy)
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    output_len: list[int] = field(default_factory=lambda: [64])
    prompt_len: list[int] = field(default_factory=lambda: [0])  # extra context tokens per prompt
    shared_context: bool = False  # the same context passage for every request (prefix-cacheable)
    temperature: float = 0.7
    warmups: int = 1
    run_timeout_s: float = 900.0  # a run that takes longer is killed and recorded as failed
    ready_timeout_s: float = 600.0  # server start-up
    memory_sample_s: float = 5.0  # resident-memory sampling period while a server is up
    # > 1: start every server first, then run the whole plan this many times (A, B, A, B...) so that
    # drift in the machine's load hits each server alike; each point reports per-metric medians.
    rounds: int = 1

    def check(self) -> None:
        if not 1 <= self.num_prompts <= MAX_PROMPTS_PER_RUN:
            raise ConfigError(f"bench.num_prompts={self.num_prompts}: use 1..{MAX_PROMPTS_PER_RUN}")
        for c in self.concurrency:
            if not 1 <= c <= MAX_CONCURRENCY:
                raise ConfigError(f"bench.concurrency has {c}: use 1..{MAX_CONCURRENCY}")
        if any(n < 1 for n in self.output_len) or any(n < 0 for n in self.prompt_len):
            raise ConfigError("bench.output_len must be >= 1 and bench.prompt_len >= 0")
        if not 1 <= self.rounds <= 10:
            raise ConfigError(f"bench.rounds={self.rounds}: use 1..10")
        if self.run_timeout_s <= 0 or self.ready_timeout_s <= 0:
            raise ConfigError("bench.run_timeout_s and bench.ready_timeout_s must be > 0")


@dataclass
class ServerSpec:
    """One server process. kind: cdserve (our server), vllm (plain vLLM OpenAI server), args
    (benchmarks/baselines/args_server.py), best_of_n (benchmarks/baselines/best_of_n_proxy.py in
    front of `upstream`, another server of this config)."""

    name: str
    kind: str
    model: str = "smollm2"  # 'smollm2' or a model folder
    backend: str = "hf"  # cdserve only
    scorer: str = "default"  # cdserve and args
    upstream: str = ""  # best_of_n only: the name of the server it fans out to
    num_candidates: int = 4  # best_of_n only
    args: list[str] = field(default_factory=list)  # extra command-line flags
    env: dict[str, str] = field(default_factory=dict)

    def check(self, names: set[str]) -> None:
        if self.kind not in SERVER_KINDS:
            raise ConfigError(f"server {self.name!r}: kind={self.kind!r}, use one of {SERVER_KINDS}")
        if self.kind == "best_of_n" and self.upstream not in names:
            raise ConfigError(f"server {self.name!r}: upstream={self.upstream!r} names no server")


@dataclass
class RunSpec:
    """A series of tool runs against one server with one control setting (sent in every request
    as the `control` extension), over the bench's sweep unless overridden."""

    label: str
    server: str
    control: dict[str, Any] | None = None
    concurrency: list[int] | None = None
    output_len: list[int] | None = None
    prompt_len: list[int] | None = None
    num_prompts: int | None = None


@dataclass
class Comparison:
    """candidate / baseline on `metric` at the given concurrency (higher-is-better metrics are
    throughputs; for latencies the ratio is still candidate / baseline). target: e.g. '>= 0.95',
    '<= 1.1', '< 1.0' (empty: report only)."""

    name: str
    candidate: str
    baseline: str
    metric: str
    concurrency: int
    target: str = ""
    output_len: int | None = None  # default: the bench's first
    prompt_len: int | None = None

    def check(self, labels: set[str]) -> None:
        for which in ("candidate", "baseline"):
            if getattr(self, which) not in labels:
                raise ConfigError(f"comparison {self.name!r}: {which}={getattr(self, which)!r} names no run")
        if self.metric not in METRICS:
            raise ConfigError(f"comparison {self.name!r}: metric={self.metric!r}, use one of {METRICS}")
        if self.target and self.target.split()[0] not in (">=", "<=", ">", "<"):
            raise ConfigError(f"comparison {self.name!r}: target={self.target!r}, write e.g. '>= 0.95'")


@dataclass
class MemorySpec:
    """Resident memory of one server under steady load: sampled through `duration_s` of
    back-to-back runs at `concurrency`; the ratio compares the end to the level at `baseline_s`."""

    server: str
    control: dict[str, Any] | None = None
    concurrency: int = 16
    duration_s: float = 600.0
    baseline_s: float = 60.0
    output_len: int = 64


@dataclass
class LoadConfig:
    bench: BenchConfig
    servers: list[ServerSpec]
    runs: list[RunSpec]
    comparisons: list[Comparison] = field(default_factory=list)
    memory: MemorySpec | None = None
    source: str = ""

    def server(self, name: str) -> ServerSpec:
        return next(s for s in self.servers if s.name == name)

    def check(self) -> LoadConfig:
        self.bench.check()
        names = {s.name for s in self.servers}
        if len(names) != len(self.servers):
            raise ConfigError("server names must be unique")
        for s in self.servers:
            s.check(names)
        labels = [r.label for r in self.runs]
        if len(set(labels)) != len(labels):
            raise ConfigError("run labels must be unique")
        for r in self.runs:
            if r.server not in names:
                raise ConfigError(f"run {r.label!r}: server={r.server!r} names no server")
        for c in self.comparisons:
            c.check(set(labels))
        if self.memory and self.memory.server not in names:
            raise ConfigError(f"memory.server={self.memory.server!r} names no server")
        return self


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> LoadConfig:
    """Read a TOML config; `overrides` replace [bench] fields (e.g. from the command line)."""
    raw = tomllib.loads(Path(path).read_text())
    try:
        bench = BenchConfig(**{**raw.get("bench", {}), **(overrides or {})})
        cfg = LoadConfig(
            bench=bench,
            servers=[ServerSpec(**s) for s in raw.get("servers", [])],
            runs=[RunSpec(**r) for r in raw.get("runs", [])],
            comparisons=[Comparison(**c) for c in raw.get("comparisons", [])],
            memory=MemorySpec(**raw["memory"]) if "memory" in raw else None,
            source=str(path),
        )
    except TypeError as e:  # an unknown or missing key
        raise ConfigError(f"{path}: {e}") from e
    return cfg.check()
