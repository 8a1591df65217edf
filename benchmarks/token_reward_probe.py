"""Would token mode with the true reward in the loop reach true-reward best-of-N at equal KL? An
in-process probe (transformers on the base model, no server), to decide whether to build it.

cdserve's token mode steers each step's top-k tokens by the scorer's value of the prefix with
that token. Here the value is the true reward of the answer text so far with the token,
`w * reward(text + z)` (the block mode's "reward in the loop", one token long); steering,
sampling and the KL are the server's own functions
(`steer_top_k_values`, `top_k_kl`: KL of the distribution sampled from against the base model's
whole-vocabulary distribution at the same temperature, summed over the answer's tokens), so the
KL is measured as `benchmarks/quality.py` measures token mode's. Same held-out prompts as
quality.py (--prompts 48: every len/48-th eval prompt), chat template, temperature, max tokens.

    python -m benchmarks.token_reward_probe --strengths 1,2,4,8 --out benchmarks/results/token_reward_probe.json

Cost: per step and row, top_k detokenisations and reward calls on the CPU (the reward is a
Python function; an HTTP reward per candidate token would be far too slow for this).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.quality.block_kl import mean_sem
from benchmarks.quality.runs import spread
from cdserve.control.steering import sampled_kl, steer_top_k_values, top_k_kl
from prefix_scorers.prompts import load_prompts
from prefix_scorers.rewards import score_texts
from prefix_scorers.rollouts import chat_prompt_ids

HERE = Path(__file__).resolve().parent


def candidate_values(tok, answers: list[list[int]], cands: torch.Tensor, reward: str, weight: float) -> torch.Tensor:
    """weight * reward(answer text + candidate) for every row's candidates (N, k)."""
    texts = [tok.decode(a + [int(z)], skip_special_tokens=True) for a, row in zip(answers, cands) for z in row]
    scores = score_texts(texts, [reward])[reward]
    return weight * torch.tensor(scores, dtype=torch.float32).view(cands.shape)


@torch.inference_mode()
def generate(model, tok, prompts: list[str], *, strength: float, reward: str, weight: float, top_k: int,
             temperature: float, max_tokens: int, eos: set[int], seed: int, keep_tail: bool = False) -> list[dict]:
    """One steered answer per prompt (a batch), with each answer's summed KL. keep_tail: the tokens
    outside the top k stay candidates at their base logits (valued at the reward of the text
    without them, which they do not change) instead of being dropped, as token mode drops them."""
    gen = torch.Generator().manual_seed(seed)
    batch = tok.pad({"input_ids": [chat_prompt_ids(tok, p) for p in prompts]}, padding_side="left", return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = len(prompts)
    answers: list[list[int]] = [[] for _ in range(n)]
    kl = [0.0] * n
    done = [False] * n
    past, step_ids, pos = None, ids, (mask.cumsum(-1) - 1).clamp(min=0)
    t = torch.full((n,), temperature)
    for _ in range(max_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
        cands = logits.topk(top_k, dim=-1).indices
        value = candidate_values(tok, answers, cands, reward, weight) if strength else torch.zeros(cands.shape)
        ids_k, steered = steer_top_k_values(logits, cands, value, torch.full((n,), strength))
        if keep_tail:  # only differences matter: subtract the text's own reward from its candidates'
            now = weight * torch.tensor(score_texts([tok.decode(a, skip_special_tokens=True) for a in answers],
                                                    [reward])[reward])[:, None] if strength else 0.0
            steered = logits.scatter(1, ids_k, steered - strength * now)
            ids_k = torch.arange(logits.shape[-1]).expand(n, -1)
            step_kl = sampled_kl(steered, logits, t, torch.ones(n), truncate=False)
        else:
            step_kl = top_k_kl(steered, ids_k, logits, t, torch.ones(n), truncate=False, any_greedy=False)
        probs = torch.softmax(steered / temperature, dim=-1)
        picked = ids_k.gather(1, torch.multinomial(probs, 1, generator=gen))  # (n, 1)
        for i in range(n):
            if done[i]:
                continue
            z = int(picked[i])
            kl[i] += float(step_kl[i])
            if z in eos:
                done[i] = True
            else:
                answers[i].append(z)
        if all(done):
            break
        step_ids = picked
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype)], dim=1)
        pos = pos[:, -1:] + 1
    return [{"prompt": p, "text": tok.decode(a, skip_special_tokens=True), "tokens": len(a), "kl": k}
            for p, a, k in zip(prompts, answers, kl)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--strengths", default="0,1,2,4,8", help="comma-separated; 0 = plain decoding")
    ap.add_argument("--reward", default="vader_compound")
    ap.add_argument("--top-k", type=int, default=100, help="the server's default top_k")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seeds", type=int, default=2, help="answers per prompt (seeds 0..S-1)")
    ap.add_argument("--keep-tail", action="store_true", help="tokens outside the top k keep their base logits")
    ap.add_argument("--out", default=str(HERE / "results" / "token_reward_probe.json"))
    args = ap.parse_args()

    from cdserve.text import eos_token_ids
    from prefix_scorers.base_model import (
        default_cache_dir,
        load_model,
        load_tokenizer,
        resolve_model,
    )

    folder = resolve_model("smollm2", default_cache_dir())
    tok, model = load_tokenizer(folder), load_model(folder)
    eos = set(eos_token_ids(folder, tok))
    prompts = [p["prompt"] for p in spread(load_prompts("eval"), args.prompts)]
    rows = []
    for s in (float(x) for x in args.strengths.split(",")):
        t0 = time.perf_counter()
        answers = [a for seed in range(args.seeds) for a in
                   generate(model, tok, prompts, strength=s, reward=args.reward, weight=1.0, top_k=args.top_k,
                            temperature=args.temperature, max_tokens=args.max_tokens, eos=eos, seed=seed,
                            keep_tail=args.keep_tail)]
        rewards = score_texts([a["text"] for a in answers], [args.reward])[args.reward]
        (r, r_se), (kl, kl_se) = mean_sem(rewards), mean_sem([a["kl"] for a in answers])
        rows.append({"strength": s, "reward": r, "reward_sem": r_se, "kl": kl, "kl_sem": kl_se,
                     "tokens": statistics.fmean(a["tokens"] for a in answers), "answers": len(answers),
                     "seconds": round(time.perf_counter() - t0, 1), "samples": answers})
        print(f"s={s:g}: {args.reward} {r:.3f} ± {r_se:.3f}, KL {kl:.2f} ± {kl_se:.2f}, "
              f"{rows[-1]['tokens']:.1f} tokens, {rows[-1]['seconds']:.0f} s", flush=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
