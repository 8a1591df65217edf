"""Is an ensemble scorer's spread a useful error bar? Calibration on held-out rollouts.

For every held-out rollout (prompts the training split held out, and optionally rollouts of the
eval prompts, whose categories the scorer never saw) and every head, at each response position:
the ensemble's value (mean over members) at the token taken, its spread (standard deviation over
members), and the absolute error |value - r_h| against the rollout's true reward. At the last
position the value estimates the reward of the whole, known answer, so its error is all the
scorer's (no luck of the continuation left): that is the headline. Reported per head and pooled:

- Spearman correlation between spread and absolute error, with a 95% bootstrap interval over
  rollouts (1,000 resamples; all positions of a rollout are resampled together); "pooled" is the
  mean of the four heads' coefficients;
- a reliability plot: rollouts binned by spread (deciles), the RMS error of each bin against its
  mean spread (a calibrated Gaussian error bar lies on y = x).

    python benchmarks/ensemble_calibration.py --scorer RUN/train/scorer --run-dir RUN [--extra-run-dir EVALRUN]

Drives the scorer directly (prefix_scorers only): calibration is a property of the scorer, not of
the server. Writes benchmarks/results/ensemble_calibration.json and
benchmarks/ensemble_calibration.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from prefix_scorers.base_model import default_cache_dir, load_model, load_tokenizer, resolve_model
from prefix_scorers.checkpoint import load_scorer
from prefix_scorers.train import load_examples, split_by_prompt


@torch.inference_mode()
def per_position(scorer, examples) -> list[dict]:
    """Per rollout: value and spread (T', H) at its response tokens, its rewards (H,)."""
    H, E = scorer.num_heads, scorer.ensemble_size
    out = []
    for e in examples:
        ids = torch.tensor([e.input_ids])
        q = scorer(ids).queries[0, e.prompt_len - 1:-1]  # (T', H*E, d_e): prefixes before each response token
        members = scorer.values_at(q, ids[0, e.prompt_len:, None])[..., 0].view(-1, H, E)  # (T', H, E)
        out.append({"value": members.mean(-1), "spread": members.std(-1), "reward": torch.tensor(e.rewards)})
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = _ranks(x.double()), _ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp(min=1e-12))


def pairs(rows: list[dict], head: int | None, final: bool, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(spread, |error|) over rows; head None: every head, each divided by its reward std."""
    heads = range(len(scale)) if head is None else [head]
    s, a = [], []
    for r in rows:
        v, sp = (r["value"][-1:], r["spread"][-1:]) if final else (r["value"], r["spread"])
        for h in heads:
            k = scale[h] if head is None else 1.0
            s.append(sp[:, h] / k)
            a.append((v[:, h] - r["reward"][h]).abs() / k)
    return torch.cat(s), torch.cat(a)


def rank_correlation(rows: list[dict], head: int | None, final: bool, scale: torch.Tensor) -> float:
    """Spearman of (spread, |error|) for one head; head None: the mean of the heads' coefficients
    (pooling raw pairs would rank heads with larger reward scales above the rest)."""
    if head is None:
        return sum(rank_correlation(rows, h, final, scale) for h in range(len(scale))) / len(scale)
    return spearman(*pairs(rows, head, final, scale))


def correlation(rows: list[dict], head: int | None, final: bool, scale: torch.Tensor, reps: int,
                seed: int) -> dict:
    s, a = pairs(rows, head, final, scale)
    g = torch.Generator().manual_seed(seed)
    boot = []
    for _ in range(reps):  # resample rollouts (all their positions together)
        idx = torch.randint(len(rows), (len(rows),), generator=g).tolist()
        boot.append(rank_correlation([rows[i] for i in idx], head, final, scale))
    lo, hi = torch.tensor(boot, dtype=torch.float64).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"spearman": round(rank_correlation(rows, head, final, scale), 3), "ci95": [round(lo, 3), round(hi, 3)], "n": len(s),
            "mean_spread": round(float(s.mean()), 4), "mean_abs_error": round(float(a.mean()), 4)}


def reliability(s: torch.Tensor, a: torch.Tensor, bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean spread, RMS error, count) per spread decile."""
    order = s.argsort()
    return [(float(s[c].mean()), float(a[c].pow(2).mean().sqrt()), len(c)) for c in order.chunk(bins) if len(c)]


def plot(sets: dict[str, list[dict]], names: list[str], scale: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 4))
    for ax, (title, head) in zip(axes, [*((n, h) for h, n in enumerate(names)), ("pooled (/ reward std)", None)]):
        top = 0.0
        for (label, rows), color in zip(sets.items(), ("tab:blue", "tab:orange")):
            pts = reliability(*pairs(rows, head, True, scale))
            xs, ys, _ = zip(*pts)
            ax.plot(xs, ys, "o-", color=color, label=label)
            top = max(top, *xs, *ys)
        ax.plot([0, top], [0, top], "k--", lw=0.8, label="calibrated (RMS error = spread)")
        ax.set_title(title)
        ax.set_xlabel("ensemble spread (decile mean)")
        ax.set_ylabel("RMS |value - reward| at the last token")
    axes[0].legend(fontsize=7)
    fig.suptitle("Ensemble scorer reliability on held-out rollouts (value of the whole answer)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scorer", required=True, help="an ensemble checkpoint (float32 training output is fine)")
    ap.add_argument("--run-dir", required=True, help="its training run (rollouts.jsonl, labels.jsonl)")
    ap.add_argument("--extra-run-dir", help="another labelled run to report apart (e.g. the eval prompts)")
    ap.add_argument("--eval-fraction", type=float, default=0.1, help="as in training: the held-out prompt share")
    ap.add_argument("--seed", type=int, default=0, help="as in training: the split's seed")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "ensemble_calibration.json"))
    ap.add_argument("--plot", default=str(HERE / "ensemble_calibration.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = resolve_model("smollm2", default_cache_dir())
    tok = load_tokenizer(base)
    scorer = load_scorer(args.scorer, tok, load_model(base).get_input_embeddings().weight.detach().float())
    if scorer.ensemble_size < 2:
        raise SystemExit(f"{args.scorer} has no ensemble: nothing to calibrate")
    heads = scorer.config.heads
    run = Path(args.run_dir)
    _, held = split_by_prompt(load_examples(run / "rollouts.jsonl", run / "labels.jsonl", heads),
                              args.eval_fraction, args.seed)
    sets = {f"held-out train-split prompts ({len(held)} rollouts)": per_position(scorer, held)}
    if args.extra_run_dir:
        extra = Path(args.extra_run_dir)
        ex = load_examples(extra / "rollouts.jsonl", extra / "labels.jsonl", heads)
        sets[f"eval prompts, unseen categories ({len(ex)} rollouts)"] = per_position(scorer, ex)
    reward_std = (scorer.config.provenance.model_extra or {}).get("reward_std")  # the training rewards'
    scale = (torch.tensor(reward_std) if reward_std else torch.tensor([e.rewards for e in held]).std(0)).clamp(min=1e-3)
    names = [h.name for h in heads]
    report = {"scorer": str(args.scorer), "ensemble": scorer.config.ensemble.model_dump(), "sets": {}}
    for label, rows in sets.items():
        report["sets"][label] = {
            where: {name: correlation(rows, h, final, scale, args.bootstrap, args.seed)
                    for h, name in [*enumerate(names), (None, "pooled")]}
            for where, final in (("last_token", True), ("all_positions", False))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    plot(sets, names, scale, Path(args.plot))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
