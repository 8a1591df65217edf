"""CPU cost of token mode's step in the vLLM worker, without the engine: the worker's logits
processor (`ScorerLogitsProcessor.apply`) driven on random logits, per phase.

N controlled rows in steady churn: each row generates `--output-tokens` tokens, then leaves and a
new request takes its place (prompt: a shared context of `--context` tokens, then 30-60 random
tokens; a row starts part-way through its answer so that the leaves are spread over the steps).
Each step hands `apply` fresh random logits (N, V) and then appends one token to every row, as
vLLM does. Time is CPU time (`time.process_time`, so another process's load does not inflate
it), ms per step over `--steps` steps after `--warmup`; torch runs `--threads` threads.

    flock /tmp/cdserve-bench.lock .venv/bin/python benchmarks/worker_step_cost.py --rows 16 64 --context 0 512
    .venv/bin/python benchmarks/worker_step_cost.py --rows 64 --context 512 --profile 15   # top torch ops

Phases (nested): `sync` is the scorer's read of the new tokens (`compact`: rows that left,
`cached step`: the one-token forward of the rows already in the cache, `prefill`: new rows);
`steer` is token mode's steering and KL (`top-k values`: candidates and the scorer's values at
them, `kl`: top_k_kl); the rest of `apply` is per-row Python. One line per (rows, context), and a
JSON line with every number (`--json`).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import time

import torch

from cdserve.backends import token_steering
from cdserve.backends.vllm import logits_processor
from cdserve.backends.vllm.logits_processor import ScorerLogitsProcessor
from cdserve.backends.vllm.scorer_loading import load_scorer_for_model
from cdserve.backends.vllm.scorer_rows import TokenControl
from prefix_scorers.base_model import default_cache_dir, resolve_model

# (label, object or module, attribute): the phases timed, each by wrapping the named function
PHASES = [("sync", "rows", "sync"), ("compact", "rows", "_compact"), ("cached step", "rows", "_step_cached"),
          ("prefill", "rows", "_prefill"), ("steer", logits_processor, "steer_in_place"),
          ("top-k values", token_steering, "top_k_values"), ("kl", token_steering, "top_k_kl")]


class PhaseTimer:
    """CPU seconds spent in each wrapped function (nested phases count in both)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, label: str, owner: object, name: str) -> None:
        if not hasattr(owner, name):
            return  # a phase this tree does not have
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.process_time() - t

        self._undo.append((owner, name, inner))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, inner in reversed(self._undo):
            if isinstance(owner, type(logits_processor)):
                setattr(owner, name, inner)
            else:
                delattr(owner, name)  # the instance attribute shadowed the method
        self._undo.clear()


class Churn:
    """N rows of a processor, each replaced by a new request after its answer."""

    def __init__(self, processor: ScorerLogitsProcessor, rows: int, context: int, output_tokens: int,
                 top_k: int, vocab: int, seed: int):
        self.p, self.output_tokens, self.top_k, self.vocab = processor, output_tokens, top_k, vocab
        self.rng = random.Random(seed)
        self.context = [self.rng.randrange(vocab) for _ in range(context)]
        self.heads = processor.scorer.num_heads
        self.count = 0
        self.outputs = {i: self._join(i, started=True) for i in range(rows)}

    def _join(self, index: int, started: bool = False) -> list[int]:
        prompt = self.context + [self.rng.randrange(self.vocab) for _ in range(self.rng.randrange(30, 60))]
        done = self.rng.randrange(0, self.output_tokens) if started else 0
        output = [self.rng.randrange(self.vocab) for _ in range(done)]
        weights = (1.0,) + (0.0,) * (self.heads - 1)
        control = TokenControl(key=f"r{self.count}", weights=weights, strength=2.0, top_k=self.top_k,
                               temperature=0.7)
        self.count += 1
        self.p.rows.add(index, control, prompt, output)
        return output

    def advance(self) -> None:
        """Every row samples a token; rows at their last token leave and are replaced."""
        for i, output in list(self.outputs.items()):
            output.append(self.rng.randrange(self.vocab))
            if len(output) >= self.output_tokens:
                self.p.rows.remove(i)
                self.outputs[i] = self._join(i)
        self.p.rows.end_update()


def measure(scorer, rows: int, context: int, args: argparse.Namespace) -> dict:
    processor = ScorerLogitsProcessor.from_scorer(scorer, torch.device("cpu"))
    vocab = scorer.config.architecture.vocab_size
    churn = Churn(processor, rows, context, args.output_tokens, args.top_k, vocab, args.seed)
    timer = PhaseTimer()
    for label, owner, name in PHASES:
        timer.wrap(label, processor.rows if owner == "rows" else owner, name)
    generator = torch.Generator().manual_seed(args.seed)
    total = 0.0
    profiler = None
    try:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                timer.seconds.clear()
                total = 0.0
                if args.profile:
                    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    profiler.__enter__()
            logits = torch.randn(rows, vocab, generator=generator)
            t = time.process_time()
            processor.apply(logits)
            total += time.process_time() - t
            churn.advance()
    finally:
        timer.restore()
        if profiler is not None:
            profiler.__exit__(None, None, None)
    result = {"rows": rows, "context": context, "apply_ms": 1e3 * total / args.steps,
              **{f"{k.replace(' ', '_')}_ms": 1e3 * v / args.steps for k, v in timer.seconds.items()},
              "cache_columns": processor.rows.kv.length, "prefill_tokens": processor.rows.prefill_tokens,
              "reused_tokens": processor.rows.reused_tokens}
    if profiler is not None:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64], help="controlled rows in the batch")
    parser.add_argument("--context", type=int, nargs="+", default=[0, 512],
                        help="tokens of shared context before each prompt")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing")
    parser.add_argument("--output-tokens", type=int, default=64, help="answer length before a row is replaced")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--scorer", default="prefix_scorers/default")
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a Hugging Face model folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also run torch.profiler over the timed steps and print its N costliest ops")
    parser.add_argument("--json", action="store_true", help="print each result as a JSON line too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scorer = load_scorer_for_model(args.scorer, resolve_model(args.model, default_cache_dir()))
    columns = ["apply", "sync", "compact", "cached step", "prefill", "steer", "top-k values", "kl"]
    print("CPU ms per step | rows, context | " + " | ".join(columns))
    for rows in args.rows:
        for context in args.context:
            r = measure(scorer, rows, context, args)
            cells = [f"{r.get(c.replace(' ', '_') + '_ms', float('nan')):.1f}" for c in columns]
            print(f"{rows}, +{context} | " + " | ".join(cells), flush=True)
            if args.json:
                print(json.dumps(r))


if __name__ == "__main__":
    main()
