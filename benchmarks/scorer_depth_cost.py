"""Cost per token of a prefix scorer by depth (copied base layers), measured as cdserve decodes:
a prefill of the prompts, then one incremental step per generated token with the KV cache, each
step giving the combined value of every vocabulary token (token mode's work per token).

    flock /tmp/cdserve-bench.lock .venv/bin/python benchmarks/scorer_depth_cost.py --layers 2 4 --threads 1

Prints, per depth, milliseconds per decode step for a batch and per token, and the base model's own
step for scale (same batch, same cache length). Weights are untrained copies: cost does not depend
on training.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from prefix_scorers.base_model import default_cache_dir, load_model, load_tokenizer, resolve_model
from prefix_scorers.checkpoint import DEFAULT_HEADS, init_from_base
from prefix_scorers.kv_cache import KVCache


@torch.no_grad()
def scorer_step_ms(scorer, batch: int, prompt_len: int, steps: int) -> float:
    ids = torch.randint(0, scorer.config.architecture.vocab_size, (batch, prompt_len))
    cache = KVCache.empty(len(scorer.layers))
    scorer(ids, cache=cache)
    H = scorer.num_heads
    w, mean, std = torch.ones(batch, H), torch.zeros(batch, H), torch.ones(batch, H)
    nxt = ids[:, -1:]
    t0 = time.perf_counter()
    for _ in range(steps):
        q = scorer(nxt, cache=cache).queries[:, -1]
        scores = scorer.combined_values(q, mean, std, w)  # (B, V)
        nxt = scores.argmax(-1, keepdim=True)
    return (time.perf_counter() - t0) / steps * 1e3


@torch.no_grad()
def base_step_ms(base, batch: int, prompt_len: int, steps: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (batch, prompt_len))
    out = base(ids, use_cache=True)
    past, nxt = out.past_key_values, ids[:, -1:]
    t0 = time.perf_counter()
    for _ in range(steps):
        out = base(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base_dir = resolve_model("smollm2", default_cache_dir())
    tok, base = load_tokenizer(base_dir), load_model(base_dir).eval()
    vocab = base.get_input_embeddings().weight.shape[0]
    rows = {"base": min(base_step_ms(base, args.batch, args.prompt_len, args.steps, vocab)
                        for _ in range(args.repeats))}
    for n in args.layers:
        scorer = init_from_base(base, tok, DEFAULT_HEADS, num_layers=n).eval()
        rows[f"scorer_{n}_layers"] = min(scorer_step_ms(scorer, args.batch, args.prompt_len, args.steps)
                                         for _ in range(args.repeats))
    print(json.dumps({"batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps,
                      "threads": args.threads, "ms_per_step": {k: round(v, 2) for k, v in rows.items()},
                      "ms_per_token": {k: round(v / args.batch, 3) for k, v in rows.items()}}, indent=2))


if __name__ == "__main__":
    main()
