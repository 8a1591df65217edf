"""Per-run table of a load run's results.json with cdserve's server counters (runner.py records
them per run): throughput and latency per round, each run's ratio to a baseline run measured in the
same round, base tokens per answer token, and reward-call time per answer token.

    python -m benchmarks.load.counters_table RESULTS.json --baseline "block K=4 M=8"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def rows(results: dict, baseline: str) -> list[dict]:
    runs = results.get("runs_by_round") or results["runs"]
    by = {(r["label"], r.get("round", 0)): r for r in runs}
    labels = list(dict.fromkeys(r["label"] for r in runs))
    rounds = sorted({r.get("round", 0) for r in runs})
    out = []
    for label in labels:
        mine = [by[(label, i)] for i in rounds if (label, i) in by and by[(label, i)].get("completed")]
        base = {i: by.get((baseline, i)) for i in rounds}
        ratio = [r["output_throughput"] / base[r.get("round", 0)]["output_throughput"] for r in mine
                 if base.get(r.get("round", 0)) and base[r.get("round", 0)].get("completed")]
        c = [r.get("server_counters") or {} for r in mine]
        answer = sum(x.get("cdserve_generation_tokens_total", 0) for x in c)
        cand = sum(x.get("cdserve_candidates_generated_total", 0) for x in c)
        reward_s = sum(x.get("cdserve_reward_call_seconds_sum", 0) for x in c)
        calls = sum(x.get("cdserve_reward_call_seconds_count", 0) for x in c)
        out.append({
            "label": label, "rounds": len(mine), "completed": sum(r["completed"] for r in mine),
            "tok_s": [round(r["output_throughput"], 2) for r in mine],
            "e2e_p50_s": [round(r["median_e2el_ms"] / 1000, 1) for r in mine],
            "ratio_to_baseline": [round(x, 3) for x in ratio],
            "ratio_median": round(statistics.median(ratio), 3) if ratio else None,
            "mean_output_len": round(statistics.mean(r["mean_output_len"] for r in mine), 1) if mine else None,
            "candidate_tokens_per_answer_token": round(cand / answer, 2) if answer and cand else None,
            "reward_calls": int(calls), "reward_ms_per_answer_token": round(1000 * reward_s / answer, 3) if calls else None,
            "reward_ms_per_call": round(1000 * reward_s / calls, 2) if calls else None,
        })
    return out


def markdown(table: list[dict], baseline: str) -> str:
    head = ("| run | output tok/s per round | e2e p50 (s) per round | tok/s / baseline per round (median) "
            "| mean answer tokens | candidate tokens per answer token | reward calls | reward ms per answer token "
            "| reward ms per call |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for t in table:
        ratio = " / ".join(map(str, t["ratio_to_baseline"])) + (f" (**{t['ratio_median']}**)" if t["ratio_median"] else "")
        lines.append(f"| {t['label']} | {' / '.join(map(str, t['tok_s']))} | {' / '.join(map(str, t['e2e_p50_s']))} "
                     f"| {ratio} | {t['mean_output_len']} | {t['candidate_tokens_per_answer_token'] or '-'} "
                     f"| {t['reward_calls'] or '-'} | {t['reward_ms_per_answer_token'] or '-'} | {t['reward_ms_per_call'] or '-'} |")
    return f"Baseline: `{baseline}`.\n\n" + head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--baseline", required=True, help="the run label every ratio divides by (same round)")
    args = ap.parse_args(argv)
    print(markdown(rows(json.loads(args.results.read_text()), args.baseline), args.baseline))


if __name__ == "__main__":
    main()
