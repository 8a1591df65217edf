"""Does control.risk guard against over-optimising an unsure scorer? Reward vs measured KL.

Starts `cdserve serve` (hf backend) with an ensemble scorer and drives it over HTTP as a user would
(the official `openai` client, control in `extra_body`). On held-out prompts
(prefix_scorers/data/prompts_eval.jsonl) it runs token mode steering one head at several
strengths, each with several values of `risk`, plus plain sampling, and records per run:

- the true reward of the steered head (its reward function, not the scorer) and its std error,
- an independent judge (AFINN word-list sentiment, benchmarks/quality/judges.py; for `positive`),
- the measured KL from the base model (control.kl: the exact per-token sum, token mode),
- the scorer's reported value and spread of the answers.

    python benchmarks/ensemble_risk.py --scorer DIR [--strengths 2,4] [--risks -0.5,0,0.5] [--prompts 16]

Writes benchmarks/results/ensemble_risk.json and benchmarks/ensemble_risk.png (reward and judge vs
measured KL, one line per risk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.quality.judges import afinn_scores
from benchmarks.quality.server import start_server
from prefix_scorers.checkpoint import DEFAULT_HEADS
from prefix_scorers.prompts import load_prompts
from prefix_scorers.rewards import score_texts

REWARD = {h.name: h.reward for h in DEFAULT_HEADS}


async def run_setting(client, model: str, prompts: list[str], control: dict, args) -> list[dict]:
    sem = asyncio.Semaphore(args.concurrency)

    async def one(i: int, prompt: str) -> dict:
        async with sem:
            r = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                temperature=args.temperature, seed=args.seed + i, extra_body={"control": control})
            c = r.choices[0]
            return {"text": c.message.content or "", "control": (c.model_extra or {}).get("control") or {}}
    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def summarise(head: str, control: dict, answers: list[dict], seconds: float) -> dict:
    texts = [a["text"] for a in answers]
    reward = score_texts(texts, [REWARD[head]])[REWARD[head]]
    judge = afinn_scores(texts)
    kl = [a["control"].get("kl") for a in answers]
    spread = [a["control"].get("spread", {}).get(head) for a in answers]
    sem = lambda xs: statistics.stdev(xs) / len(xs) ** 0.5
    return {"control": control, "n": len(texts), "seconds": round(seconds, 1),
            "reward": statistics.fmean(reward), "reward_sem": sem(reward),
            "judge_afinn": statistics.fmean(judge), "judge_sem": sem(judge),
            "kl": statistics.fmean(k for k in kl if k is not None), "kl_sem": sem([k for k in kl if k is not None]),
            "value": statistics.fmean(a["control"].get("values", {}).get(head, 0.0) for a in answers),
            "spread": statistics.fmean(s for s in spread if s is not None) if any(s is not None for s in spread) else None,
            "samples": [{"text": t, "reward": r} for t, r in zip(texts, reward)]}


def plot(results: list[dict], head: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    plain = next((r for r in results if r["control"]["mode"] == "none"), None)
    risks = sorted({r["control"]["risk"] for r in results if r["control"]["mode"] == "token"})
    for ax, key, label in ((axes[0], "reward", f"true reward ({REWARD[head]})"), (axes[1], "judge_afinn", "AFINN judge")):
        for risk in risks:
            rs = sorted((r for r in results if r["control"]["mode"] == "token" and r["control"]["risk"] == risk),
                        key=lambda r: r["kl"])
            ax.errorbar([r["kl"] for r in rs], [r[key] for r in rs], yerr=[r[key.replace("judge_afinn", "judge") + "_sem"]
                        for r in rs], marker="o", capsize=3, label=f"risk {risk:+g}")
            for r in rs:
                ax.annotate(f"s={r['control']['strength']:g}", (r["kl"], r[key]), fontsize=7)
        if plain:
            ax.axhline(plain[key], color="gray", ls=":", label="plain sampling")
        ax.set_xlabel("measured KL from the base model (nats per answer)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"token mode, steering '{head}': reward vs measured KL by risk (held-out prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def main_async(args) -> list[dict]:
    from openai import AsyncOpenAI

    prompts = [p["prompt"] for p in load_prompts("eval")[: args.prompts]]
    log = HERE / "results" / "ensemble_risk_server.log"
    proc, url = start_server(["--backend", "hf", "--scorer", args.scorer], args.threads, log, args.start_timeout)
    try:
        client = AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=3600)
        model = (await client.models.list()).data[0].id
        settings = [{"mode": "none"}] + [
            {"mode": "token", "weights": {args.head: 1.0}, "strength": s, "top_k": args.top_k, "risk": r}
            for s in args.strengths for r in args.risks]
        results = []
        for control in settings:
            t0 = time.perf_counter()
            answers = await run_setting(client, model, prompts, control, args)
            results.append(summarise(args.head, control, answers, time.perf_counter() - t0))
            r = results[-1]
            print(f"{json.dumps(control)}: reward {r['reward']:.3f} +- {r['reward_sem']:.3f}, judge "
                  f"{r['judge_afinn']:.2f}, KL {r['kl']:.2f}, spread {r['spread']}, {r['seconds']} s", flush=True)
        return results
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scorer", required=True, help="an ensemble scorer checkpoint")
    ap.add_argument("--head", default="positive")
    ap.add_argument("--strengths", type=lambda s: [float(x) for x in s.split(",")], default=[2.0, 4.0])
    ap.add_argument("--risks", type=lambda s: [float(x) for x in s.split(",")], default=[-0.5, 0.0, 0.5])
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--out", default=str(HERE / "results" / "ensemble_risk.json"))
    ap.add_argument("--plot", default=str(HERE / "ensemble_risk.png"))
    args = ap.parse_args()
    results = asyncio.run(main_async(args))
    Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "runs": results}, indent=2) + "\n")
    plot(results, args.head, Path(args.plot))


if __name__ == "__main__":
    main()
