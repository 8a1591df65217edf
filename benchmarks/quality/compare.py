"""The same runs of two quality caches side by side: each run's reward of one head (the first by default,
`--head` another, scored with the reward DEFAULT_HEADS gives it now) under both, and the
paired difference (the same prompts and seeds, resampling prompts; report.py's `paired_interval`).

Two scorers (or two commits) run over the same prompts and seeds give the same answers where
steering did not change a token, so the paired interval is much narrower than the two runs' own
standard errors suggest. Runs are matched by name (runs.py `name`); runs only one cache has are skipped.

    python -m benchmarks.quality.compare OLD.json NEW.json      # e.g. git show REV:benchmarks/results/quality.json
    python -m benchmarks.quality.compare OLD.json NEW.json --head specific
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.quality.report import HEAD, paired_interval
from benchmarks.quality.runs import name
from prefix_scorers.checkpoint import DEFAULT_HEADS
from prefix_scorers.rewards import score_texts

REWARDS = {h.name: h.reward for h in DEFAULT_HEADS}


def scored(run: dict, head: str = HEAD) -> dict:
    """The run as report.py's paired_interval reads it: answers and `head`'s reward per answer
    (stored as HEAD's, the key paired_interval reads)."""
    answers, reward = run["samples"], REWARDS[head]
    return {"answers": answers, f"{HEAD}_per_answer": score_texts([a["text"] for a in answers], [reward])[reward]}


def compare(old: dict, new: dict, head: str = HEAD) -> list[dict]:
    """One row per run name both caches hold with samples over the same prompts."""
    before = {name(r): r for r in old["runs"] if r.get("samples")}
    rows = []
    for run in new["runs"]:
        key = name(run)
        if key not in before or not run.get("samples"):
            continue
        if [x["prompt"] for x in before[key]["samples"]] != [x["prompt"] for x in run["samples"]]:
            continue  # another prompt set: nothing to pair
        a, b = scored(before[key], head), scored(run, head)
        lo, hi = paired_interval(b, a)
        rows.append({"run": key, "old": statistics.fmean(a[f"{HEAD}_per_answer"]),
                     "new": statistics.fmean(b[f"{HEAD}_per_answer"]), "diff_95": (lo, hi),
                     "same_answers": sum(x["text"] == y["text"] for x, y in zip(a["answers"], b["answers"]))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--head", default=HEAD, choices=sorted(REWARDS), help="the head whose reward to compare")
    args = ap.parse_args()
    rows = compare(json.loads(Path(args.old).read_text()), json.loads(Path(args.new).read_text()), args.head)
    print(f"| run | old {args.head} | new {args.head} | new - old | 95% interval | identical answers |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["diff_95"]
        print(f"| {r['run']} | {r['old']:.3f} | {r['new']:.3f} | {r['new'] - r['old']:+.3f} | [{lo:+.3f}, {hi:+.3f}] "
              f"| {r['same_answers']} |")


if __name__ == "__main__":
    main()
