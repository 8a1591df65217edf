"""Would token mode gain from candidate values the scorer reads (lookahead) instead of its bilinear
head? Offline, on the held-out rollouts of benchmarks/token_signal.py, for one head.

Token mode today values candidate z after prefix s as Q(s, z) = <U h_s, E_z> (+ b): the trunk never
reads z. A lookahead mode would read each candidate (k scorer tokens per step, as ARGS does) and
value the state s.z. This script measures what that would buy before anyone builds it:

1. a linear state-value readout V(h) = w.h + b on the scorer's final hidden state, fitted by ridge
   regression onto the reward at every prefix of training rollouts (the trunk frozen: the same
   features the bilinear head has), with its held-out R^2 of the final value for comparison;
2. every stored top-k candidate of every held-out position read in one pass per rollout (each
   candidate token attends to its own prefix in the rollout's KV cache and to itself), valued by the
   readout;
3. the token signal (prefix_scorers/token_signal.py) of those lookahead values against the bilinear
   head's on the same rollouts.

    python -m benchmarks.lookahead_signal --scorer prefix_scorers/default --train-rollouts 1500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.token_signal import held_out
from prefix_scorers.base_model import default_cache_dir, load_model, load_tokenizer, resolve_model
from prefix_scorers.checkpoint import load_scorer
from prefix_scorers.kv_cache import KVCache
from prefix_scorers.model import PrefixScorer
from prefix_scorers.prompts import read_jsonl
from prefix_scorers.token_signal import rollout_sums, signal_stats, signal_sums
from prefix_scorers.train import load_examples

HERE = Path(__file__).resolve().parent


def hidden_states(scorer: PrefixScorer, ids: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
    """The final normalised hidden states (T, d) of one sequence ids (1, T), and its filled cache."""
    T = ids.shape[1]
    cache = KVCache.empty(len(scorer.layers))
    cache.mask = torch.ones(1, T, dtype=torch.bool)
    mask = scorer._attention_mask(cache.mask, T, 0)
    x = scorer.in_proj(F.embedding(ids, scorer.embedding))
    positions = torch.arange(T)[None]
    for i, block in enumerate(scorer.layers):
        x = block(x, positions, mask, cache, i)
    return scorer.norm(x)[0], cache


def candidate_states(scorer: PrefixScorer, cache: KVCache, starts: torch.Tensor,
                     candidates: torch.Tensor) -> torch.Tensor:
    """Hidden states (L, k, d) after reading each candidate: candidates (L, k) of L positions,
    candidate (t, j) read after the first starts[t] tokens of the cached sequence. One pass: every
    candidate attends to its prefix's cached keys and to itself, at position starts[t]."""
    L, k = candidates.shape
    n, Tc = cache.length, L * k
    positions = starts.repeat_interleave(k)[None]  # (1, Tc)
    prefix = torch.arange(n)[None, :] < positions[0][:, None]  # (Tc, n)
    mask = torch.cat([prefix, torch.eye(Tc, dtype=torch.bool)], 1)[None, None]  # (1, 1, Tc, n + Tc)
    scratch = KVCache(list(cache.keys), list(cache.values), cache.mask)  # append() rebinds, never mutates
    x = scorer.in_proj(F.embedding(candidates.reshape(1, Tc), scorer.embedding))
    for i, block in enumerate(scorer.layers):
        x = block(x, positions, mask, scratch, i)
    return scorer.norm(x)[0].view(L, k, -1)


def fit_readout(features: list[torch.Tensor], targets: list[float], ridge: float) -> torch.Tensor:
    """Ridge regression w (d + 1,) of targets onto features: each a (n_i, d) block sharing one
    target. The penalty is `ridge` x 1% of the mean feature second moment (scale-free); the
    intercept is not penalised."""
    d = features[0].shape[1]
    xtx = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    xty = torch.zeros(d + 1, dtype=torch.float64)
    for f, y in zip(features, targets):
        x = torch.cat([f.double(), torch.ones(len(f), 1, dtype=torch.float64)], 1)
        xtx += x.T @ x
        xty += x.sum(0) * y
    penalty = ridge * xtx.diagonal()[:-1].mean() / 100 * torch.eye(d + 1, dtype=torch.float64)
    penalty[-1, -1] = 0
    return torch.linalg.solve(xtx + penalty, xty)


def readout(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return (h.double() @ w[:-1] + w[-1]).float()


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scorer", default=str(HERE.parent / "prefix_scorers" / "default"))
    ap.add_argument("--head", default="positive")
    ap.add_argument("--train-run-dir", default=str(default_cache_dir() / "runs" / "i14-pool"),
                    help="training rollouts for the readout (never a held-out prompt)")
    ap.add_argument("--train-rollouts", type=int, default=1500, help="evenly spaced through the run")
    ap.add_argument("--run-dir", default=str(default_cache_dir() / "runs" / "h3-snap"))
    ap.add_argument("--prompts", default=str(HERE.parent / "prefix_scorers" / "data" / "prompts_eval.jsonl"))
    ap.add_argument("--ridge", type=float, default=1.0)
    ap.add_argument("--base-model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="results JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    base = resolve_model(args.base_model, default_cache_dir())
    tokenizer = load_tokenizer(base)
    emb = load_model(base).get_input_embeddings().weight.detach().float()
    scorer = load_scorer(Path(args.scorer), tokenizer, emb).eval().float()
    head = scorer.config.head_names.index(args.head)
    keep = {p["id"] for p in read_jsonl(Path(args.prompts))}

    train_run, run = Path(args.train_run_dir), Path(args.run_dir)
    train = load_examples(train_run / "rollouts.jsonl", train_run / "labels.jsonl", scorer.config.heads)
    train = [e for e in train if e.prompt_id not in keep]
    train = train[::max(1, len(train) // args.train_rollouts)][:args.train_rollouts]
    feats = [hidden_states(scorer, torch.tensor([e.input_ids]))[0][e.prompt_len - 1:] for e in train]
    w = fit_readout(feats, [e.rewards[head] for e in train], args.ridge)

    held = held_out(run, Path(args.prompts), scorer.config.heads)
    sums_a, sums_s, finals = [], [], []
    for e in held:
        s, n = e.prompt_len, len(e.input_ids)
        h, cache = hidden_states(scorer, torch.tensor([e.input_ids]))
        cand = torch.tensor(e.topk_ids[:n - s])
        probs = torch.softmax(torch.tensor(e.topk_logprobs[:n - s]), -1)
        values = readout(w, candidate_states(scorer, cache, s + torch.arange(n - s), cand))  # (L, k)
        taken = readout(w, h[s:])  # the state after each response token: the taken candidate's
        a, v = rollout_sums(values[None, :, None], probs[None], taken[None, :, None],
                            torch.ones(1, n - s, dtype=torch.bool))
        sums_a.append(a[0]), sums_s.append(v[0]), finals.append(float(taken[-1]))
    rewards = torch.tensor([[e.rewards[head]] for e in held])
    lookahead = signal_stats(torch.stack(sums_a), torch.stack(sums_s), rewards)
    bilinear = signal_stats(*(x[:, head:head + 1] for x in signal_sums(scorer, held, 16, tokenizer.pad_token_id)))
    final = torch.tensor(finals)
    r2 = 1 - ((final - rewards[:, 0]) ** 2).mean() / rewards[:, 0].var(unbiased=False)
    out = {"scorer": args.scorer, "head": args.head, "train_rollouts": len(train), "held_out_rollouts": len(held),
           "readout_final_r2": round(float(r2), 4),
           "lookahead": {k: round(float(v[0]), 4) for k, v in lookahead.items()},
           "bilinear": {k: round(float(v[0]), 4) for k, v in bilinear.items()},
           "seconds": round(time.time() - t0)}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
