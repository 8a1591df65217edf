"""Profile one load point: where a server spends its CPU while the load tool drives it.

    python -m benchmarks.load.profile_point --config benchmarks/load/configs/reduced.toml \
        --server cdserve-vllm --control '{"mode": "none"}' --concurrency 16 --num-prompts 48 --out DIR

Starts the server, runs a warm-up point, then the measured point under `py-spy record
--subprocesses` (from .venv), and writes DIR/profile.json: the tool's metrics, CPU seconds per
process of the server's tree (server, vLLM engine core, worker) and the leaf frames with the
most samples per process; DIR/pyspy.txt holds the raw collapsed stacks.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.load.bench_tool import ToolRun, run_tool
from benchmarks.load.config import load_config
from benchmarks.load.dataset import write_prompts
from benchmarks.load.servers import resolve_model_dir, start_server

REPO = Path(__file__).resolve().parents[2]


def cpu_by_process(pid: int) -> dict[int, tuple[str, float]]:
    root = psutil.Process(pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (" ".join(p.cmdline()[:3])[:80] or p.name(), t.user + t.system)
        except psutil.NoSuchProcess:
            pass
    return out


def top_frames(raw: Path, n: int = 12) -> dict[str, list[tuple[int, str]]]:
    """Most sampled leaf frames per (innermost) process in py-spy's collapsed stacks."""
    per: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        proc = [f for f in frames if f.startswith("process ")][-1][:60]
        per[proc][frames[-1][:140]] += int(count)
    return {p: [(c, f) for f, c in cnt.most_common(n)] for p, cnt in per.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--server", required=True, help="a server name of the config")
    ap.add_argument("--control", default="", help="control extension as JSON (default: none sent)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cfg, out = load_config(args.config), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = cfg.server(args.server)
    if spec.kind == "best_of_n":
        raise SystemExit("profile the upstream server, not the proxy")
    control = json.loads(args.control) if args.control else None
    tok_dir = str(resolve_model_dir(cfg.bench.tokenizer))
    from prefix_scorers.base_model import load_tokenizer

    prompts = write_prompts(REPO / cfg.bench.prompts, out / "prompts.jsonl", args.num_prompts + 4,
                            load_tokenizer(Path(tok_dir)), 0)
    server = start_server(spec, out, cfg.bench.ready_timeout_s)
    try:
        def point(n: int, name: str) -> dict:
            run = ToolRun(server.base_url, server.model_id, tok_dir, prompts, n, args.concurrency,
                          args.output_len, cfg.bench.temperature, 2, {"control": control} if control else None,
                          out, name)
            return run_tool(run, cfg.bench.run_timeout_s, out / f"tool-{name}.log")

        point(args.concurrency, "warmup")
        before, t0 = cpu_by_process(server.proc.pid), time.monotonic()
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.proc.pid),
                                "--subprocesses", "--rate", str(args.rate), "--format", "raw", "--nonblocking",
                                "-o", str(out / "pyspy.txt")], stdout=subprocess.DEVNULL,
                               stderr=(out / "pyspy.err").open("w"))
        metrics = point(args.num_prompts, "measured")
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
        after, wall = cpu_by_process(server.proc.pid), time.monotonic() - t0
    finally:
        server.stop()
    cpu = [{"pid": pid, "process": name, "cpu_s": round(t - before.get(pid, (name, 0.0))[1], 2),
            "cores_busy": round((t - before.get(pid, (name, 0.0))[1]) / wall, 2)} for pid, (name, t) in after.items()]
    report = {"server": spec.name, "control": control, "concurrency": args.concurrency, "wall_s": round(wall, 1),
              "metrics": {k: metrics.get(k) for k in ("completed", "failed", "output_throughput",
                                                      "median_ttft_ms", "median_tpot_ms", "median_e2el_ms")},
              "cpu": cpu, "top_frames": top_frames(out / "pyspy.txt") if (out / "pyspy.txt").is_file() else {}}
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("metrics", "cpu")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
