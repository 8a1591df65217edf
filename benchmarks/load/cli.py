"""`python -m benchmarks.load run --config FILE [--out DIR] [--num-prompts N] [--concurrency 1,4]`
runs the sweep and writes DIR/results.json, DIR/report.md and DIR/plots/*.png;
`python -m benchmarks.load report DIR/results.json` redraws the report from saved results."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the servers, run the sweep, stop them, report")
    run.add_argument("--config", required=True, help="TOML file (see benchmarks/load/configs/)")
    run.add_argument("--out", help="output folder (default: benchmarks/load/out/<UTC time>)")
    run.add_argument("--num-prompts", type=int, help="override bench.num_prompts")
    run.add_argument("--concurrency", type=_ints, help="override bench.concurrency, e.g. 1,4,16,64")
    run.add_argument("--output-len", type=_ints, help="override bench.output_len, e.g. 64,256")
    run.add_argument("--prompt-len", type=_ints, help="override bench.prompt_len, e.g. 0,512")
    rep = sub.add_parser("report", help="redraw report.md and plots from a results.json")
    rep.add_argument("results")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    from benchmarks.load.report import write_report

    if args.command == "report":
        path = Path(args.results)
        md, _ = write_report(json.loads(path.read_text()), path.parent)
        console.print(f"wrote {md}")
        return 0

    from benchmarks.load.config import load_config
    from benchmarks.load.runner import Sweep

    overrides = {k: v for k, v in (("num_prompts", args.num_prompts), ("concurrency", args.concurrency),
                                   ("output_len", args.output_len), ("prompt_len", args.prompt_len))
                 if v is not None}
    cfg = load_config(args.config, overrides)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or Path(__file__).parent / "out" / stamp)
    out.mkdir(parents=True, exist_ok=True)
    results = Sweep(cfg, out, console).run()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md, plots = write_report(results, out)
    console.print(f"wrote {out / 'results.json'}, {md} and {len(plots)} plots")
    failed = not results["runs"] or results.get("server_errors")
    return 1 if failed else 0
