"""Results -> comparisons with ratios and targets, PNG plots, and a Markdown report.

Reads only the results JSON, so `python -m benchmarks.load report RESULTS.json` redraws
everything without re-running the load.
"""

from __future__ import annotations

import operator
import statistics
from pathlib import Path
from typing import Any

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_UNITS = {"request_throughput": "req/s", "output_throughput": "tok/s"}


def find_run(results: dict[str, Any], label: str, concurrency: int, output_len: int,
             prompt_len: int) -> dict[str, Any] | None:
    return next((r for r in results["runs"] if r["label"] == label and r["concurrency"] == concurrency
                 and r["output_len"] == output_len and r["prompt_len"] == prompt_len), None)


def compare(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each configured comparison with both values, the ratio, and whether the target is met
    (None when a run is missing or failed)."""
    bench, rows = results["config"]["bench"], []
    for c in results["config"]["comparisons"]:
        o = c["output_len"] or bench["output_len"][0]
        p = c["prompt_len"] if c["prompt_len"] is not None else bench["prompt_len"][0]
        cand = find_run(results, c["candidate"], c["concurrency"], o, p)
        base = find_run(results, c["baseline"], c["concurrency"], o, p)
        cv = cand.get(c["metric"]) if cand and cand.get("completed") else None
        bv = base.get(c["metric"]) if base and base.get("completed") else None
        ratio = cv / bv if cv is not None and bv else None
        paired = _round_ratios(cand, base, c["metric"]) if ratio is not None else []
        if paired:  # interleaved rounds: the median of the paired ratios cancels load drift
            ratio = statistics.median(paired)
        met = None
        if ratio is not None and c["target"]:
            op, bound = c["target"].split()
            met = _OPS[op](ratio, float(bound))
        rows.append({**c, "output_len": o, "prompt_len": p, "candidate_value": cv, "baseline_value": bv,
                     "ratio": ratio, "round_ratios": paired, "met": met})
    return rows


def _round_ratios(cand: dict[str, Any], base: dict[str, Any], metric: str) -> list[float]:
    """candidate / baseline for each round both completed (empty without rounds)."""
    b = {r["round"]: r.get(metric) for r in base.get("rounds", []) if r.get("completed")}
    return [r[metric] / b[r["round"]] for r in cand.get("rounds", [])
            if r.get("completed") and r.get(metric) is not None and b.get(r["round"])]


def _workloads(results: dict[str, Any]) -> list[tuple[int, int]]:
    return sorted({(r["prompt_len"], r["output_len"]) for r in results["runs"]})


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per workload (prompt length, output length): throughput vs concurrency, and latency
    percentiles (TTFT, TPOT, end-to-end; p50 solid, p99 dashed) vs concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for p, o in _workloads(results):
        runs = [r for r in results["runs"] if r["prompt_len"] == p and r["output_len"] == o and r.get("completed")]
        labels = list(dict.fromkeys(r["label"] for r in runs))
        ticks = sorted({r["concurrency"] for r in runs})

        def concurrency_axis(ax, ticks=ticks) -> None:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(c) for c in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("concurrent requests")
        title = f"prompt +{p} tokens, output {o} tokens"

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for label in labels:
            rs = sorted((r for r in runs if r["label"] == label), key=lambda r: r["concurrency"])
            cs = [r["concurrency"] for r in rs]
            axes[0].plot(cs, [r["output_throughput"] for r in rs], marker="o", label=label)
            axes[1].plot(cs, [r["request_throughput"] for r in rs], marker="o", label=label)
        for ax, what in zip(axes, ("output tokens/s", "requests/s")):
            concurrency_axis(ax)
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Throughput vs concurrency ({title})")
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"throughput_p{p}_o{o}.png"))

        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for i, label in enumerate(labels):
            rs = sorted((r for r in runs if r["label"] == label), key=lambda r: r["concurrency"])
            cs = [r["concurrency"] for r in rs]
            color = f"C{i % 10}"
            for ax, m in zip(axes, ("ttft", "tpot", "e2el")):
                ax.plot(cs, [r.get(f"p50_{m}_ms", 0) for r in rs], marker="o", color=color, label=f"{label} p50")
                ax.plot(cs, [r.get(f"p99_{m}_ms", 0) for r in rs], ls="--", marker="x", color=color,
                        label=f"{label} p99")
        for ax, name in zip(axes, ("time to first token (ms)", "time per output token (ms)",
                                   "end-to-end latency (ms)")):
            concurrency_axis(ax)
            ax.set_yscale("log")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=6)
        fig.suptitle(f"Latency percentiles, p50 solid, p99 dashed ({title})")
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"latency_p{p}_o{o}.png"))

    mem = results.get("memory")
    if mem and mem.get("samples"):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([t for t, _ in mem["samples"]], [m for _, m in mem["samples"]])
        ax.axvline(mem["baseline_s"], color="grey", ls=":")
        ax.set_xlabel("seconds under load")
        ax.set_ylabel("RSS (MiB)")
        ax.set_title(f"Resident memory of {mem['server']} at concurrency {mem['concurrency']}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / "memory.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(r: dict[str, Any], metric: str) -> str:
    return "/".join(_f(r.get(f"p{q}_{metric}_ms"), 0) for q in (50, 90, 99))


def _f(v: Any, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def markdown(results: dict[str, Any], plots: list[Path], rel_to: Path) -> str:
    m, lines = results["meta"], []
    lines += ["# Load benchmark", "",
              f"- date: {m['date']}; commit `{m['commit']}`",
              f"- machine: {m['cpu']} ({m['cpu_count']} CPUs), GPU: {m['gpu'] or 'none'}; {m['platform']}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f", Python {m['python']}",
              f"- command: `{m['command']}` (config `{results['config']['source']}`)",
              (f"- {results['config']['bench'].get('rounds', 1)} interleaved rounds (every server up, the plan run "
               "once per round); values are per-metric medians over rounds, ratios the median of the paired "
               "per-round ratios" if results["config"]["bench"].get("rounds", 1) > 1 else "- one round"),
              ("- load tool: `vllm bench serve` (chat completions, streaming), the exact command of each "
              "run is in the results JSON (`tool_command`)"), ""]
    comps = compare(results)
    if comps:
        lines += ["## Comparisons", "",
                  "| comparison | metric | concurrency | candidate | baseline | ratio | per round | target | met |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in comps:
            met = {True: "yes", False: "**no**", None: "-"}[c["met"]]
            lines.append(f"| {c['name']} | {c['metric']} | {c['concurrency']} | {c['candidate']}: "
                         f"{_f(c['candidate_value'], 2)} | {c['baseline']}: {_f(c['baseline_value'], 2)} | "
                         f"{_f(c['ratio'], 3)} | {', '.join(_f(x, 2) for x in c['round_ratios']) or '-'} | "
                         f"{c['target'] or '-'} | {met} |")
        lines.append("")
    for p, o in _workloads(results):
        lines += [f"## Runs: prompt +{p} tokens, output {o} tokens", "",
                  ("| run | conc. | done/failed | req/s | out tok/s | mean out len | TTFT p50/p90/p99 ms | "
                  "TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms | E2E p50/p90/p99 ms | RSS MiB |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in results["runs"] if r["prompt_len"] == p and r["output_len"] == o):
            lines.append(f"| {r['label']} | {r['concurrency']} | {r.get('completed', 0)}/{r.get('failed', 0)} | "
                         f"{_f(r.get('request_throughput'), 3)} | {_f(r.get('output_throughput'))} | "
                         f"{_f(r.get('mean_output_len'))} | {_pct(r, 'ttft')} | {_pct(r, 'tpot')} | {_pct(r, 'itl')} | "
                         f"{_pct(r, 'e2el')} | {_f(r.get('rss_after_mib'), 0)} |")
        lines.append("")
    errors = {(r["label"], e) for r in results["runs"] for e in r.get("errors", [])}
    if errors or results.get("server_errors"):
        lines += ["## Errors", ""]
        lines += [f"- {label}: `{e}`" for label, e in sorted(errors)]
        lines += [f"- server {k}: `{v}`" for k, v in results.get("server_errors", {}).items()]
        lines.append("")
    mem = results.get("memory")
    if mem:
        lines += ["## Memory", "",
                  (f"{mem['server']} at concurrency {mem['concurrency']} for {mem['duration_s']:.0f} s: RSS "
                  f"{mem['rss_baseline_mib']:.0f} MiB at {mem['baseline_s']:.0f} s, {mem['rss_end_mib']:.0f} MiB "
                  f"at the end (ratio {mem['ratio_end_to_baseline']:.3f}), max {mem['rss_max_mib']:.0f} MiB."), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{pl.stem}]({pl.relative_to(rel_to).as_posix()})" for pl in plots] + [""]
    return "\n".join(lines)


def write_report(results: dict[str, Any], out_dir: Path) -> tuple[Path, list[Path]]:
    plots = plot(results, out_dir / "plots")
    md = out_dir / "report.md"
    md.write_text(markdown(results, plots, out_dir))
    return md, plots
