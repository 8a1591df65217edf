"""Held-out R^2 of the final value for several scorers on the same rollouts, with a paired
bootstrap of each scorer's difference to the first (resampling rollouts; 95% percentile interval);
where the run has several rollouts per prompt, the same for the scorer as a ranker
(prefix_scorers/ranking.py: scorer-ranked best-of-n's share of true-reward best-of-n's gain,
resampling prompts).

    python benchmarks/paired_r2.py --run-dir HELD_OUT_RUN SCORER_A SCORER_B ...

HELD_OUT_RUN holds rollouts.jsonl and labels.jsonl of prompts none of the scorers trained on.
`--head NAME=REWARD` measures every scorer's head NAME against REWARD (labelled in the run), so a
scorer trained when that head had another reward is compared on the same truth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from prefix_scorers.base_model import default_cache_dir, load_model, load_tokenizer, resolve_model
from prefix_scorers.checkpoint import load_scorer
from prefix_scorers.ranking import per_prompt_picks, rankable, share_of_gain
from prefix_scorers.train import TrainConfig, load_examples, position_values


def final_values(scorer, examples, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, H) values after each rollout's last token and (N, H) true rewards, in example order."""
    values, rewards = position_values(scorer, examples, TrainConfig(batch_size=16), pad_id)
    return values[None].numpy(), rewards[None].numpy()


def r2(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    return 1 - ((p - t) ** 2).mean(0) / np.maximum(t.var(0), 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scorers", nargs="+")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--base-model", default="smollm2")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--head", action="append", default=[], metavar="NAME=REWARD",
                    help="measure head NAME against REWARD for every scorer (repeatable)")
    args = ap.parse_args()
    override = dict(h.split("=", 1) for h in args.head)
    base = resolve_model(args.base_model, default_cache_dir())
    tok = load_tokenizer(base)
    emb = load_model(base).get_input_embeddings().weight.detach().float()
    run = Path(args.run_dir)
    values, heads = {}, None
    for path in args.scorers:
        scorer = load_scorer(Path(path), tok, emb).eval()
        heads = scorer.config.head_names
        unknown = set(override) - set(heads)
        if unknown:
            raise SystemExit(f"--head names {sorted(unknown)}, not a head of {path} (heads: {heads})")
        specs = [h.model_copy(update={"reward": override.get(h.name, h.reward)}) for h in scorer.config.heads]
        examples = load_examples(run / "rollouts.jsonl", run / "labels.jsonl", specs)
        values[path] = final_values(scorer, examples, tok.pad_token_id)
    first = args.scorers[0]
    truth = values[first][1]
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(truth), size=(args.boot, len(truth)))
    out = {"rollouts": len(truth), "heads": heads, "r2": {}, "diff_vs_first": {}}
    for path, (p, t) in values.items():
        assert np.allclose(t, truth), "scorers must be evaluated on the same rollouts"
        out["r2"][path] = {h: round(float(v), 4) for h, v in zip(heads, r2(p, t))}
        if path != first:
            d = np.stack([r2(p[i], t[i]) - r2(values[first][0][i], t[i]) for i in idx])  # (boot, H)
            lo, hi = np.percentile(d, [2.5, 97.5], axis=0)
            out["diff_vs_first"][path] = {h: [round(float(a), 4), round(float(b), 4)]
                                          for h, a, b in zip(heads, lo, hi)}
    ix = rankable(examples)  # the ranker, paired over prompts: plain rollouts, >= 2 per prompt
    if ix:
        ids = [examples[i].prompt_id for i in ix]
        picks = {path: per_prompt_picks(torch.from_numpy(p[ix]), torch.from_numpy(t[ix]), ids)
                 for path, (p, t) in values.items()}
        pidx = torch.from_numpy(rng.integers(0, len(picks[first][0]), size=(args.boot, len(picks[first][0]))))
        out["ranker_share"], out["ranker_diff_vs_first"] = {}, {}
        for path, pk in picks.items():
            out["ranker_share"][path] = {h: round(float(v), 4) for h, v in zip(heads, share_of_gain(*pk))}
            if path != first:
                d = torch.stack([share_of_gain(*(x[i] for x in pk)) - share_of_gain(*(x[i] for x in picks[first]))
                                 for i in pidx]).numpy()
                lo, hi = np.percentile(d, [2.5, 97.5], axis=0)
                out["ranker_diff_vs_first"][path] = {h: [round(float(a), 4), round(float(b), 4)]
                                                     for h, a, b in zip(heads, lo, hi)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
