"""The token signal of several scorers side by side, on the same held-out rollouts, with bootstrap
intervals over prompts and each scorer's paired difference from the first.

What it measures (prefix_scorers/token_signal.py): `efficiency` = Cov(S_A, r) / sqrt(S), where S_A
is the summed advantage Q(s_t, y_t) - V(s_t) of the tokens a base rollout took and S the summed
variance of the candidates' values. Token mode's reward gain at a measured KL is about
efficiency x sqrt(2 KL) (for small strengths); true-reward best-of-N reaches its gain at KL
log N - (N-1)/N, so the efficiency a scorer needs to match best-of-N at equal KL is
gain_N / sqrt(2 KL_N), printed for the plain-sample gains passed with --best-of.

    python -m benchmarks.token_signal --scorer prefix_scorers/default --scorer RUN/train/scorer
    python -m benchmarks.token_signal --scorer prefix_scorers/default --run-dir RUNS/h3-snap \\
        --best-of 2=0.187 --best-of 8=0.409 --out benchmarks/results/token_signal.json

The held-out rollouts: `--run-dir` (rollouts.jsonl + labels.jsonl with the stored top-k), those
of the `--prompts` (default: the 94 eval prompts, never a training prompt of the default scorer).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from prefix_scorers.base_model import default_cache_dir, load_model, load_tokenizer, resolve_model
from prefix_scorers.checkpoint import load_scorer
from prefix_scorers.prompts import read_jsonl
from prefix_scorers.token_signal import signal_stats, signal_sums
from prefix_scorers.train import load_examples

HERE = Path(__file__).resolve().parent


def held_out(run: Path, prompts: Path, heads) -> list:
    """The rollouts of `prompts` in `run` (train.Example, labelled with `heads`' rewards)."""
    if not (run / "rollouts.jsonl").is_file() or not (run / "labels.jsonl").is_file():
        raise SystemExit(f"no rollouts.jsonl + labels.jsonl in {run}: make held-out rollouts with `prefix-scorers "
                         f"rollouts --prompts {prompts} --run-dir DIR` and `prefix-scorers label --run-dir DIR` "
                         "(the heads' rewards), then pass --run-dir DIR")
    keep = {p["id"] for p in read_jsonl(prompts)}
    return [e for e in load_examples(run / "rollouts.jsonl", run / "labels.jsonl", heads) if e.prompt_id in keep]


def bootstrap(sums: list[tuple[torch.Tensor, ...]], prompt_ids: list[str], rounds: int,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Efficiency (rounds, scorers, H) over prompt resamples, and the full-data one (scorers, H)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompt_ids):
        groups.setdefault(p, []).append(i)
    members = list(groups.values())
    g = torch.Generator().manual_seed(seed)
    full = torch.stack([signal_stats(*s)["efficiency"] for s in sums])
    out = []
    for _ in range(rounds):
        pick = torch.randint(len(members), (len(members),), generator=g).tolist()
        rows = torch.tensor([i for k in pick for i in members[k]])
        out.append(torch.stack([signal_stats(*(x[rows] for x in s))["efficiency"] for s in sums]))
    return torch.stack(out), full


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scorer", action="append", required=True, help="scorer folder (repeatable; the first is "
                    "the reference of the paired differences)")
    ap.add_argument("--run-dir", default=str(default_cache_dir() / "runs" / "h3-snap"),
                    help="held-out rollouts with labels and stored top-k candidates")
    ap.add_argument("--prompts", default=str(HERE.parent / "prefix_scorers" / "data" / "prompts_eval.jsonl"))
    ap.add_argument("--base-model", default="smollm2")
    ap.add_argument("--best-of", action="append", default=[], help="N=GAIN: true-reward best-of-N's reward gain "
                    "over plain decoding (the quality report), for the efficiency it needs")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="results JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = resolve_model(args.base_model, default_cache_dir())
    tokenizer = load_tokenizer(base)
    emb = load_model(base).get_input_embeddings().weight.detach().float()
    run = Path(args.run_dir)
    sums, heads, examples = [], None, None
    for path in args.scorer:
        scorer = load_scorer(Path(path), tokenizer, emb).eval()
        names = scorer.config.head_names
        if heads is not None and names != heads:
            raise SystemExit(f"{path} has heads {names}, the first scorer {heads}: compare scorers of the same heads")
        heads = names
        if examples is None:  # the same rollouts for every scorer (same heads, so the same labels)
            examples = held_out(run, Path(args.prompts), scorer.config.heads)
        sums.append(signal_sums(scorer, examples, 16, tokenizer.pad_token_id))
    prompt_ids = [e.prompt_id for e in examples]
    draws, full = bootstrap(sums, prompt_ids, args.bootstrap, seed=0)
    q = torch.tensor([0.025, 0.975], dtype=draws.dtype)
    lo_hi = lambda x: [(round(lo, 4), round(hi, 4)) for lo, hi in zip(*x.quantile(q, dim=0).tolist())]  # per head
    result = {"run_dir": str(run), "rollouts": len(prompt_ids), "prompts": len(set(prompt_ids)), "heads": heads,
              "scorers": []}
    for j, path in enumerate(args.scorer):
        stats = signal_stats(*sums[j])
        row = {"scorer": path, **{k: dict(zip(heads, [round(x, 5) for x in v.tolist()])) for k, v in stats.items()},
               "efficiency_interval": dict(zip(heads, lo_hi(draws[:, j]))),
               "minus_first": dict(zip(heads, [round(x, 4) for x in (full[j] - full[0]).tolist()])),
               "minus_first_interval": dict(zip(heads, lo_hi(draws[:, j] - draws[:, 0])))}
        result["scorers"].append(row)
        print(f"{path}")
        for h in heads:
            print(f"  {h:9s} efficiency {row['efficiency'][h]:.3f} {list(row['efficiency_interval'][h])}  "
                  f"signal ratio {row['signal_ratio'][h]:.2f}  minus first {row['minus_first'][h]:+.3f} "
                  f"{list(row['minus_first_interval'][h])}")
    needed = {}
    for spec in args.best_of:
        n, gain = spec.split("=")
        kl = math.log(int(n)) - (int(n) - 1) / int(n)
        needed[n] = round(float(gain) / math.sqrt(2 * kl), 3)
        print(f"efficiency token mode needs to match true-reward best-of-{n} (gain {gain} at KL {kl:.2f}): "
              f"{needed[n]}")
    result["needed_for_best_of"] = needed
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
