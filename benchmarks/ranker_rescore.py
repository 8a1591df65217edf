"""The scorer as a ranker, offline: scorer-ranked vs true-reward best-of-N on the quality
benchmark's cached plain samples (results/quality.json, 64 per prompt), with any scorer.

The quality report's "scorer-ranked best-of-N (client, recomputed)" rows rank the samples by the
`combined` value the server returned with each one (the server's scorer). This script recomputes
that value with another scorer, the way cdserve does for a finished answer (one full pass, the
value at the last answer token, EOS included, normalised by the scorer's statistics at that
position, weights {head: 1}), and builds the same rows with the report's own `client_rows`.

    python -m benchmarks.ranker_rescore --scorer prefix_scorers/default        # today's ranking
    python -m benchmarks.ranker_rescore --scorer RUN/train/scorer --head positive
    python -m benchmarks.ranker_rescore --scorer DIR --samples 16   # the first 16 per prompt: 4x faster
    python -m benchmarks.ranker_rescore --scorer DIR --update-cache   # the samples now carry DIR's values

`--update-cache` writes the recomputed values into the cache's samples run, marked with the
scorer's `scorer_id` and `combined_recomputed_offline`: the quality report's scorer-ranked rows
and best_of_n's measured KL then use this scorer's values (benchmarks/quality.py reuses the
samples, whose texts do not depend on the scorer, for a benchmark of this scorer).

The answers' token ids are not cached: they are the answer text re-tokenised (plus EOS when the
answer stopped), which can differ from the sampled ids; with the server's scorer the output says
how often the recomputed ranking picks the same sample as the server's values.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from benchmarks.quality.report import NS, client_rows
from benchmarks.quality.runs import scorer_id
from prefix_scorers.base_model import default_cache_dir, load_model, load_tokenizer, resolve_model
from prefix_scorers.checkpoint import load_scorer
from prefix_scorers.rollouts import chat_prompt_ids

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def combined_value(scorer, prompt_ids: list[int], answer_ids: list[int], head: int) -> float:
    """Head `head`'s normalised value of a finished answer (cdserve's final value, weight 1)."""
    ids = torch.tensor([prompt_ids + answer_ids[:-1]])
    q = scorer(ids).queries[:, -1]  # (1, H*E, d_e): the prefix before the last answer token
    raw = scorer.values_at(q, torch.tensor([[answer_ids[-1]]]))[0, :, 0]  # (H*E,)
    value = scorer.head_values(raw[None], dim=-1)[0]  # (H,): the ensemble mean
    mean, std = scorer.norm_stats(torch.tensor([len(answer_ids) - 1]))  # (1, H)
    return float((value[head] - mean[0, head]) / std[0, head])


def rescored(samples: dict, scorer, tokenizer, head: str) -> tuple[dict, float]:
    """A copy of the samples run with every `combined` recomputed by `scorer`; and the share of
    prompts whose best-of-all-samples pick agrees with the stored values."""
    names = [h.name for h in scorer.config.heads]
    if head not in names:
        raise ValueError(f"scorer has heads {names}, not {head!r}: pass --head")
    eos = tokenizer.eos_token_id
    out, same = copy.deepcopy(samples), 0
    for p in out["per_prompt"]:
        prompt_ids = chat_prompt_ids(tokenizer, p["prompt"])
        stored = [c["combined"] for c in p["controls"]]
        for c, text, finish in zip(p["controls"], p["texts"], p["finish_reasons"]):
            answer = tokenizer.encode(text, add_special_tokens=False) + ([eos] if finish == "stop" else [])
            c["combined"] = combined_value(scorer, prompt_ids, answer or [eos], names.index(head))
        new = [c["combined"] for c in p["controls"]]
        same += max(range(len(new)), key=new.__getitem__) == max(range(len(stored)), key=stored.__getitem__)
    return out, same / len(out["per_prompt"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scorer", required=True, help="scorer folder (prefix_scorers/default, RUN/train/scorer)")
    ap.add_argument("--results", default=str(HERE / "results" / "quality.json"), help="the quality benchmark's runs")
    ap.add_argument("--head", default="positive", help="the head that ranks (weight 1); the report's HEAD")
    ap.add_argument("--out", help="write the rows' numbers here (JSON)")
    ap.add_argument("--samples", type=int, default=0,
                    help="rank only the first K samples of each prompt (best-of-N up to K; 0: all of them)")
    ap.add_argument("--update-cache", action="store_true",
                    help="store the recomputed values in --results' samples run (marked with the scorer's id)")
    args = ap.parse_args()

    data = json.loads(Path(args.results).read_text())
    runs = data["runs"]
    samples = max((r for r in runs if r.get("samples_per_prompt")), key=lambda r: r["samples_per_prompt"])
    if args.samples and args.update_cache:
        ap.error("--update-cache stores every sample's value: leave --samples out")
    if 0 < args.samples < samples["samples_per_prompt"]:
        k = args.samples
        samples = {**samples, "samples_per_prompt": k, "per_prompt": [
            {**p, **{f: p[f][:k] for f in ("texts", "finish_reasons", "controls")},
             "rewards": {h: v[:k] for h, v in p["rewards"].items()}} for p in samples["per_prompt"]]}
    none = next(r for r in runs if r["mode"] == "none" and not r.get("samples_per_prompt") and "max_tokens" not in r)
    from prefix_scorers.rewards import score_texts

    reward = {"positive": "vader_compound"}.get(args.head, args.head)
    base = sum(score_texts([a["text"] for a in none["samples"]], [reward])[reward]) / len(none["samples"])
    folder = resolve_model("smollm2", default_cache_dir())
    tokenizer = load_tokenizer(folder)
    embedding = load_model(folder).get_input_embeddings().weight.detach()
    scorer = load_scorer(args.scorer, tokenizer, embedding)
    new, agree = rescored(samples, scorer, tokenizer, args.head)
    ns = [n for n in NS if n <= samples["samples_per_prompt"]]
    rows = {r["label"]: r for r in client_rows(new, ns, heads=(args.head,))}
    result = {"scorer": args.scorer, "head": args.head, "prompts": len(samples["per_prompt"]),
              "plain": round(base, 4), f"same_best_of_{samples['samples_per_prompt']}_pick_as_stored": round(agree, 4),
              "n": {}}
    print(f"{args.scorer}: {len(samples['per_prompt'])} prompts, plain decoding {args.head} {base:.3f}; "
          f"best-of-{samples['samples_per_prompt']} pick equal to the stored values' for {agree:.0%} of prompts")
    for n in NS:
        tr, sc = rows.get(f"true-reward best-of-{n} (client)"), rows.get(f"scorer-ranked best-of-{n} (client, recomputed)")
        if not tr:
            continue
        t, s = tr["reward"][args.head], sc["reward"][args.head]
        share = (s - base) / (t - base)
        result["n"][n] = {"true_reward": round(t, 4), "scorer_ranked": round(s, 4), "share_of_gain": round(share, 4)}
        print(f"best-of-{n}: true-reward {t:.3f}, scorer-ranked {s:.3f}: {share:.0%} of the true-reward gain")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.update_cache:
        new.update(scorer_id=scorer_id(args.scorer), combined_recomputed_offline=True)
        data["runs"] = [new if r is samples else r for r in runs]
        Path(args.results).write_text(json.dumps(data, indent=1) + "\n")
        print(f"{args.results}: samples run now carries scorer_id {new['scorer_id']}'s values")


if __name__ == "__main__":
    main()
