"""Measured KL of block mode (issue 14 item 1): best-of-K per block, under the base distribution of
the block's ranking score from S extra base samples of that block.

Block mode keeps, at each block b, the best of K base continuations of the answer so far (the
prompt and the accepted tokens before b) by a ranking score. Given that prefix, block b is
best-of-K of the base policy's block distribution, so by the chain rule of KL

    KL(block policy || base) = sum_b E_{prefix_b ~ block policy}[ KL_b(prefix_b) ],
    KL_b(prefix) = KL(best-of-K of score_b | prefix || base)        (over texts = over scores, ties
                                                                     broken among exchangeable
                                                                     candidates: kl.py)

and the answer the server returned is one draw of the prefixes: sum_b KL_b(its own prefix_b) is
an unbiased sample of the answer-level KL (of its plug-in estimate), and the mean over answers,
with its standard error, is the estimate. KL_b is `kl.best_of_n_kl(pool_b, K)`: best-of-K under
the base distribution fitted to S base samples of the block from the same prefix, a value seen
twice or more an atom (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment
policy": pi_K(s) = F(s)^K - F_(s)^K, and log K - (K-1)/K without ties; the same estimator as
best-of-N's). With all S scores distinct a block costs exactly the bound log K - (K-1)/K that
cdserve reports per selection; identical blocks (EOS at once, a forced token) or a reward that
gives many blocks one value (VADER's 0 for text without sentiment words) cost less.

What is ranked, and where (cdserve/control/choice.py `ChoiceController.select`, the hf engine's
`selection.Selection.advance`): value = combined + sum_r weight_r * reward_r(text), with
- combined: the scorer's sum_h w_h (Q_h - mean_h(pos)) / std_h(pos) of the candidate's last token
  (EOS included), pos its index in the answer (`ScorerRunner.final_values` and `combine`, reused
  here); 0 when every weight is 0 (the reward-ranked runs send weights {});
- reward_r: the request's reward of the candidate's answer text so far (prefix + block, EOS
  excluded, special tokens skipped: `reward_texts`).
The samples of a block stop as a candidate does: at EOS, at the block's length (M, or what is
left of max_tokens), at the first sentence end in the text the block added (segment sentence),
or before a token whose base next-token entropy exceeds the threshold, past the block's first
token (segment entropy). The accepted blocks are rebuilt from the answer's text by the same rules.

The base samples are drawn in-process with transformers (same model, temperature and top-p as
the server; float32 on CPU as the server there), S rows from one prefix at a time. The answer is
re-tokenised from its text (the quality cache keeps text, not ids); an answer whose
re-tokenisation has another length than the server's completion tokens is counted and reported.

    python -m benchmarks.quality.block_kl --samples 16       # every block run in results/quality.json

Results: results/quality_block_kl.json (per run: mean and s.e. of the answer KL, the bound, per-block
KLs, the accepted block's rank among its S samples as a check that the score is the server's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.quality.kl import best_of_n_kl, best_of_n_kl_bound, pool_rank

HERE = Path(__file__).resolve().parent.parent
RESULTS = HERE / "results"


# -- the estimate (pure) ---------------------------------------------------------------------------
def answer_kl(pools: Sequence[Sequence[float]], k: int) -> float:
    """KL of one block-mode answer: the sum over its blocks of best-of-K's KL under each block's
    base score distribution (pools: the S base samples' scores of each block)."""
    if not pools:
        raise ValueError("an answer has at least one block")
    return sum(best_of_n_kl(pool, k) for pool in pools)


def mean_sem(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)


# -- segments --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """Where a block ends: cdserve.control.segments, as ChoiceController and the engines apply it."""

    kind: str  # fixed | sentence | entropy
    block_size: int
    entropy_threshold: float = 3.0

    def __post_init__(self):
        if self.kind not in ("fixed", "sentence", "entropy"):
            raise ValueError(f"segment must be fixed, sentence or entropy, got {self.kind!r}")

    def ends_before(self, entropy: float, taken: int) -> bool:
        """Segment entropy: the block ends before a token the base model is unsure of."""
        return self.kind == "entropy" and taken >= 1 and entropy > self.entropy_threshold

    def ends_after(self, taken: int, limit: int, start_text: str, text: str) -> bool:
        """After a (non-EOS) token: the block is full, or (sentence) its text has a sentence end."""
        from cdserve.control.segments import SENTENCE_END

        return taken >= limit or (self.kind == "sentence" and SENTENCE_END.search(text, len(start_text)) is not None)


def next_entropy(logits: torch.Tensor) -> torch.Tensor:
    from cdserve.control.segments import next_token_entropy

    return next_token_entropy(logits)


def split_blocks(answer: list[int], eos: set[int], budget: int, seg: Segment, decode: Callable[[list[int]], str],
                 entropies: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """The accepted blocks [start, end) of an answer's tokens (a final EOS included), replaying the
    controller's rules; entropies[i]: the base model's next-token entropy before token i."""
    blocks, start = [], 0
    while start < len(answer):
        limit = min(seg.block_size, budget - start)
        start_text, end = decode(answer[:start]), start
        while end < len(answer):
            if entropies is not None and seg.ends_before(entropies[end], end - start):
                break
            end += 1
            if answer[end - 1] in eos or seg.ends_after(end - start, limit, start_text, decode(answer[:end])):
                break
        blocks.append((start, end))
        start = end
    return blocks


# -- base samples and scores (in-process) ----------------------------------------------------------
class BlockSampler:
    """S base continuations of a block from a prefix, and their ranking scores as the server computes
    them."""

    def __init__(self, model, tokenizer, scorer, eos: set[int], temperature: float, top_p: float, seed: int):
        from cdserve.backends.scorer_runner import ScorerRunner

        self.model, self.tok, self.eos = model, tokenizer, eos
        self.runner = ScorerRunner(scorer, torch.device("cpu")) if scorer is not None else None
        self.heads = scorer.config.head_names if scorer is not None else []
        self.temperature, self.top_p = temperature, top_p
        self.gen = torch.Generator().manual_seed(seed)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def entropies(self, ids: list[int], start: int) -> list[float]:
        """Next-token entropy (temperature 1) before each token ids[start:], from one pass."""
        logits = self.model(input_ids=torch.tensor([ids[:-1]])).logits[0, start - 1:]
        return next_entropy(logits).tolist()

    @torch.inference_mode()
    def sample(self, prefix: list[int], n: int, limit: int, seg: Segment, answer_start: int) -> list[list[int]]:
        """n block continuations of prefix (prompt + accepted answer tokens; the answer's first
        `answer_start` of them precede the block), ended as the controller ends candidates."""
        from cdserve.control.steering import apply_top_p

        out = self.model(input_ids=torch.tensor([prefix]), use_cache=True)
        past = out.past_key_values
        past.batch_repeat_interleave(n)
        logits = out.logits[:, -1].expand(n, -1)
        before = prefix[len(prefix) - answer_start:]  # the answer's tokens before the block
        start_text = self.decode(before)
        rows: list[list[int]] = [[] for _ in range(n)]
        alive = [True] * n
        while True:
            ent = next_entropy(logits).tolist() if seg.kind == "entropy" else [0.0] * n
            for i in range(n):
                if alive[i] and seg.ends_before(ent[i], len(rows[i])):
                    alive[i] = False
            if not any(alive):
                break
            scaled = apply_top_p(logits.float() / self.temperature, torch.full((n,), self.top_p))
            tok = torch.multinomial(scaled.softmax(-1), 1, generator=self.gen)[:, 0].tolist()
            for i in range(n):
                if not alive[i]:
                    continue
                rows[i].append(tok[i])
                if tok[i] in self.eos:
                    alive[i] = False
                elif seg.kind == "sentence" or len(rows[i]) >= limit:
                    text = self.decode(before + rows[i]) if seg.kind == "sentence" else ""
                    alive[i] = not seg.ends_after(len(rows[i]), limit, start_text, text)
            if not any(alive):
                break
            # finished rows read a placeholder; their samples are already complete
            step = torch.tensor([[t if a else self.eos_pad() for t, a in zip(tok, alive)]]).T
            out = self.model(input_ids=step, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        return rows

    def eos_pad(self) -> int:
        return min(self.eos)

    @torch.inference_mode()
    def scores(self, prompt: list[int], answer_prefix: list[int], blocks: list[list[int]],
               weights: dict[str, float], rewards: dict[str, float]) -> list[float]:
        """Ranking score of each block continuing answer_prefix: combined + sum_r w_r reward_r."""
        value = [0.0] * len(blocks)
        if any(weights.values()):
            unknown = set(weights) - set(self.heads)
            if unknown:
                raise ValueError(f"weights name heads {sorted(unknown)} the scorer does not have ({self.heads})")
            seqs = [prompt + answer_prefix + b for b in blocks]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
            valid = torch.tensor([[True] * len(s) + [False] * (width - len(s)) for s in seqs])
            q = self.runner.scorer(ids, valid=valid).queries  # (S, T, H*E, d_e)
            last = torch.tensor([len(s) - 1 for s in seqs])
            qa = q[torch.arange(len(seqs)), last - 1]  # read before the block's last token, at it
            raw = self.runner.values_at(qa, ids[torch.arange(len(seqs)), last][:, None])[:, :, 0]
            pos = torch.tensor([len(answer_prefix) + len(b) - 1 for b in blocks])
            w = torch.tensor([[weights.get(h, 0.0) for h in self.heads]] * len(blocks))
            value = self.runner.combine(raw, pos, w).double().tolist()
        if rewards:
            from prefix_scorers.rewards import score_texts

            texts = [self.decode(answer_prefix + [t for t in b if t not in self.eos]) for b in blocks]
            scored = score_texts(texts, list(rewards))
            value = [v + sum(w * scored[r][i] for r, w in rewards.items()) for i, v in enumerate(value)]
        return value


def measure_answer(sampler: BlockSampler, prompt: list[int], answer: list[int], budget: int, seg: Segment,
                   k: int, samples: int, weights: dict[str, float], rewards: dict[str, float]) -> dict:
    """Per block of one answer: the S base samples' scores, best-of-K's KL, the accepted block's
    score and its rank among the samples."""
    ents = sampler.entropies(prompt + answer, len(prompt)) if seg.kind == "entropy" else None
    blocks = split_blocks(answer, sampler.eos, budget, seg, sampler.decode, ents)
    pools, kls, ranks = [], [], []
    for start, end in blocks:
        limit = min(seg.block_size, budget - start)
        drawn = sampler.sample(prompt + answer[:start], samples, limit, seg, start)
        scored = sampler.scores(prompt, answer[:start], [*drawn, answer[start:end]], weights, rewards)
        pool, won = scored[:-1], scored[-1]
        pools.append(pool)
        kls.append(best_of_n_kl(pool, k))
        ranks.append((pool_rank(pool, won) - 1) / samples)  # share of the samples below the accepted block
    return {"blocks": [list(b) for b in blocks], "block_kl": kls, "kl": answer_kl(pools, k),
            "accepted_quantile": ranks, "pools": pools}


# -- the quality cache -----------------------------------------------------------------------------
def run_segment(run: dict) -> Segment:
    return Segment(run.get("segment", "fixed"), run["block_size"], run.get("entropy_threshold", 3.0))


def measure_run(sampler: BlockSampler, run: dict, samples: int, budget: int, limit: int | None = None,
                seed: int = 0, done: list[dict] | None = None, save: Callable[[dict], None] | None = None) -> dict:
    """Every answer of a block run (the first `limit`); answer i's samples are seeded by (seed, i),
    so `done` (answers measured before, in order) is kept and the rest continue it; `save` gets
    the result after each answer (a long run can be cut short and resumed)."""
    from prefix_scorers.rollouts import chat_prompt_ids

    seg, k = run_segment(run), run["num_candidates"]
    per, t0 = list(done or []), time.perf_counter()
    for i, a in enumerate(run["samples"][:limit]):
        if i < len(per):
            continue
        sampler.gen.manual_seed(seed * 1_000_003 + i)
        prompt = chat_prompt_ids(sampler.tok, a["prompt"])
        answer = sampler.tok(a["text"], add_special_tokens=False)["input_ids"]
        finish = a.get("finish_reason") or ("length" if len(answer) >= budget else "stop")
        if finish == "stop":
            answer = answer + [sampler.eos_pad()]
        m = measure_answer(sampler, prompt, answer, budget, seg, k, samples, run["weights"], run.get("rewards") or {})
        per.append({"prompt": a["prompt"], **m, "retokenised_length_matches": a.get("completion_tokens") is None or
                    len(answer) - (finish == "stop") == a["completion_tokens"]})
        if save is not None:
            save(summary(run, per, samples, time.perf_counter() - t0))
    return summary(run, per, samples, time.perf_counter() - t0)


def summary(run: dict, per: list[dict], samples: int, seconds: float) -> dict:
    k = run["num_candidates"]
    kls = [p["kl"] for p in per]
    bound = statistics.fmean(len(p["blocks"]) * best_of_n_kl_bound(k) for p in per)
    mean, sem = mean_sem(kls)
    q = [x for p in per for x in p["accepted_quantile"]]
    return {"kl_measured": mean, "kl_measured_sem": sem, "kl_bound": bound, "kl_reported": run["kl"],
            "blocks_per_answer": statistics.fmean(len(p["blocks"]) for p in per),
            "accepted_quantile_mean": statistics.fmean(q),
            "retokenised_length_mismatch": sum(not p["retokenised_length_matches"] for p in per),
            "samples_per_block": samples, "answers": len(per), "seconds": round(seconds, 1), "per_answer": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS / "quality.json"), help="the quality run cache")
    ap.add_argument("--out", default=str(RESULTS / "quality_block_kl.json"))
    ap.add_argument("--samples", type=int, default=16, help="S: base samples per block")
    ap.add_argument("--scorer", default="prefix_scorers/default", help="the scorer the block runs used")
    ap.add_argument("--runs", default="", help="';'-separated run names, as quality.py --only takes them "
                    "(default: every block run)")
    ap.add_argument("--limit", type=int, default=None, help="first answers of each run only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from cdserve.text import eos_token_ids
    from prefix_scorers.base_model import (
        default_cache_dir,
        load_model,
        load_tokenizer,
        resolve_model,
    )
    from prefix_scorers.checkpoint import load_scorer

    data = json.loads(Path(args.results).read_text())
    meta, runs = data["meta"], [r for r in data["runs"] if r["mode"] == "block"]
    from benchmarks.quality.runs import named, scorer_id, scorer_label, uses_scorer

    sid = scorer_id(args.scorer)  # a run ranked by a scorer is measured with that scorer only
    runs = [r for r in runs if not uses_scorer(r) or r.get("scorer_id") == sid]
    if args.runs:  # by name: a reward-ranked run with the scorer's weights has the label of one without
        runs = named(runs, args.runs)
    model_dir = resolve_model("smollm2", default_cache_dir())
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    scorer = load_scorer(args.scorer, tok, model.get_input_embeddings().weight.detach())
    out_path = Path(args.out)

    def stored() -> dict:
        return json.loads(out_path.read_text()) if out_path.exists() else {}

    for run in runs:
        key = scorer_label(run)
        old = stored().get(key)
        same = old and (old["samples_per_block"], old.get("scorer_id"), old.get("seed")) == (args.samples, sid, args.seed)
        done = old["per_answer"] if same else []

        def save(res: dict, key=key) -> None:
            everything = stored()  # another process may have written other runs
            everything[key] = {"scorer": args.scorer, "scorer_id": sid, "seed": args.seed, **res}
            out_path.write_text(json.dumps(everything, indent=1) + "\n")

        sampler = BlockSampler(model, tok, scorer, eos_token_ids(model_dir, tok), meta["temperature"], 1.0, args.seed)
        res = measure_run(sampler, run, args.samples, meta["max_tokens"], args.limit, args.seed, done, save)
        print(f"{key}: KL measured {res['kl_measured']:.3f} ± {res['kl_measured_sem']:.3f} "
              f"(bound {res['kl_bound']:.3f}, reported {res['kl_reported']:.3f}); accepted block's quantile "
              f"among its samples {res['accepted_quantile_mean']:.2f}; {res['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
