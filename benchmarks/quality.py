"""Quality benchmark: how far does each control mode move the true rewards, at what KL and cost?

Drives a cdserve server over HTTP as a user would (the official `openai` client, control in
`extra_body`). On held-out prompts (prefix_scorers/data/prompts_eval.jsonl, never trained on) it
runs `none`, `token` at several strengths, `block` at several K (fixed M) and `best_of_n` at
several N, steering one head at a time (weight 1), plus a weights sweep between `positive` and
`concise` in token mode. For every run it records, per answer:

- the true reward of every head (the reward functions of prefix_scorers.rewards, not the scorer),
- the KL from the base model the server reports (token: exact sum of per-step KL; block and
  best_of_n: the bound log K - (K-1)/K per selection),
- tokens the base model generated per accepted token (control.tokens_generated / completion tokens).

For the first head it also runs (issues 14 and 15): 64 plain samples per prompt with the same
seeds (choice j of a request with n=64 draws from generator row j, the row best_of_n's candidate
j uses: the first N samples are best_of_n N's candidates; the server it starts allows n=64), best_of_n and block with the true
reward in the loop (`control.rewards`), early-pruned best_of_n (`prune_every`, `keep_fraction`)
and `concise` at 128 tokens. benchmarks/quality/report.py then builds, from the stored runs, the
GRUE-style report: true-reward best-of-N and scorer-ranked best-of-N computed client-side from
the samples, an independent judge, fluency, perplexity, reported and measured KL
(benchmarks/quality/kl.py), compute, and the issues' targets.

    python benchmarks/quality.py                        # starts `cdserve serve` itself (hf backend)
    python benchmarks/quality.py --url http://host:8000 # or uses a running server (started with --max-n 64)
    python benchmarks/quality.py --quick                # 8 prompts, fewer settings (smoke run)
    python benchmarks/quality.py --only 'none;token s=1 top_k=20'   # these runs, in this order

Results go to benchmarks/results/quality.json (each run is cached there: a rerun only does what
is missing; a run that depends on the scorer is reused only if it ran with the same scorer
weights, `scorer_id`, and is redone otherwise), the plots to benchmarks/quality_reward_vs_kl.png and
benchmarks/quality_weights_sweep.png, and a markdown table to benchmarks/results/quality_table.md;
the report to benchmarks/results/quality_report.{md,json}, benchmarks/quality_reward_vs_measured_kl.png
and benchmarks/quality_reward_vs_compute.png (`python -m benchmarks.quality.report` rebuilds them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.quality.runs import (
    DEFAULT_STRENGTH,
    DEFAULT_TOP_K,
    SCORER_IN_REWARD_UNITS,
    label,
    named,
    reusable,
    scorer_id,
    spread,
    sweep_points,
    token_words,
    top_k_words,
    with_rewards,
)
from benchmarks.quality.server import start_server as start_cdserve
from prefix_scorers.checkpoint import DEFAULT_HEADS
from prefix_scorers.prompts import load_prompts
from prefix_scorers.rewards import score_texts

HEADS = {h.name: h.reward for h in DEFAULT_HEADS}
MODES = ("none", "token", "block", "best_of_n")
FINDINGS = "### Findings"


# Settings per steered head. The first head gets the widest sweep, `concise` token mode and
# best-of-4; `specific` and `readable` token mode only. Bounded: this machine is slow and every
# setting is a full generation pass over the prompts (block/best_of_n with K candidates cost K).
# Token mode runs at each strength for each top_k of "top_ks": the server's default for every head;
# for the first head also the candidates for that default (top 20, top 100, the whole vocabulary).
TOP_K_CHOICES = tuple(dict.fromkeys((DEFAULT_TOP_K, 20, 100, 0)))
FULL = {"token": [0.5, 1.0, 2.0, 4.0], "top_ks": TOP_K_CHOICES, "block": [2, 4], "best_of_n": [8, 2, 4]}
OTHER_HEADS = sorted({1.0, DEFAULT_STRENGTH, 4.0})  # the other heads: the server's default strength among them
REDUCED = {"token": OTHER_HEADS, "top_ks": (DEFAULT_TOP_K,), "block": [], "best_of_n": [4]}
TOKEN_ONLY = {"token": OTHER_HEADS, "top_ks": (DEFAULT_TOP_K,), "block": [], "best_of_n": []}
QUICK = {"token": [1.0, 4.0], "top_ks": (DEFAULT_TOP_K,), "block": [4], "best_of_n": [4]}
PLAUSIBILITY = (0.05, 0.1)  # control.plausibility of each head's strongest token run (the default is 0)


def plan(quick: bool, heads: list[str]) -> list[dict]:
    """The runs: one dict per (mode, setting, weights). Token mode runs at the server's default
    top_k and, for the first head, also at the other choices (top_k 0, the whole vocabulary, has a
    KL that goes to 0 with the strength; truncation to the top k alone costs KL)."""
    runs = [{"mode": "none", "weights": {heads[0]: 1.0}}]
    for i, head in enumerate(heads):
        spec = QUICK if quick else FULL if i == 0 else REDUCED if head == "concise" else TOKEN_ONLY
        w = {head: 1.0}
        runs += [{"mode": "token", "weights": w, "strength": s, "top_k": k} for k in spec["top_ks"] for s in spec["token"]]
        if i == 0 and not quick:  # the default top_k with the other tokens kept (control.tail keep)
            runs += [{"mode": "token", "weights": w, "strength": s, "top_k": DEFAULT_TOP_K, "tail": "keep"}
                     for s in spec["token"]]
        if not quick:  # the strongest steering with control.plausibility: the fluency lever
            runs += [{"mode": "token", "weights": w, "strength": max(spec["token"]), "top_k": DEFAULT_TOP_K,
                      "plausibility": p} for p in PLAUSIBILITY]
        runs += [{"mode": "block", "weights": w, "block_size": 8, "num_candidates": k} for k in spec["block"]]
        runs += [{"mode": "best_of_n", "weights": w, "num_candidates": n} for n in spec["best_of_n"]]
    return runs


# Issue 14/15 runs, for the first head (`positive`): N plain samples per prompt (the true-reward
# best-of-N baseline and the base distributions the KL estimates need), the reward in the loop,
# early-pruned best-of-N and the concise-length check at 128 tokens. In the order they run: an
# interrupted pass has the rows that matter most. `reward` is the first head's reward function.
# 64 samples: true-reward best-of-N up to N=64 (measured KL about 3.2), so that block and strong
# token runs, whose KL is past best-of-16's 1.8, meet a measured baseline instead of none.
SAMPLES = 64


def issue_plan(head: str, reward: str, quick: bool) -> list[dict]:
    w, rw = {head: 1.0}, {reward: 1.0}
    prune = {"prune_every": 8, "keep_fraction": 0.5}
    runs = [
        {"mode": "none", "weights": w, "samples_per_prompt": 4 if quick else SAMPLES},
        {"mode": "best_of_n", "weights": {}, "rewards": rw, "num_candidates": 4},  # = client-side? (a check)
        {"mode": "best_of_n", "weights": w, "num_candidates": 8, **prune},
        {"mode": "best_of_n", "weights": {}, "rewards": rw, "num_candidates": 8, **prune},
        {"mode": "block", "weights": {}, "rewards": rw, "num_candidates": 4, "block_size": 8, "segment": "fixed"},
        {"mode": "block", "weights": {}, "rewards": rw, "num_candidates": 4, "block_size": 24, "segment": "sentence"},
        {"mode": "none", "weights": {"concise": 1.0}, "max_tokens": 128},
        # the server's default strength (not sent), at its default top_k (sent: part of the cache key)
        {"mode": "token", "weights": {"concise": 1.0}, "top_k": DEFAULT_TOP_K, "max_tokens": 128},
        {"mode": "best_of_n", "weights": w, "num_candidates": 16, **prune},
        {"mode": "best_of_n", "weights": {}, "rewards": rw, "num_candidates": 16, **prune},
        {"mode": "block", "weights": {}, "rewards": rw, "num_candidates": 4, "block_size": 24, "segment": "entropy"},
        # the reward of the text so far plus the scorer's estimate of the final reward: a weight of
        # SCORER_IN_REWARD_UNITS puts the scorer's normalised value back in reward units
        {"mode": "block", "weights": {head: SCORER_IN_REWARD_UNITS}, "rewards": rw, "num_candidates": 4,
         "block_size": 8, "segment": "fixed"},
        {"mode": "block", "weights": {head: SCORER_IN_REWARD_UNITS}, "rewards": rw, "num_candidates": 4,
         "block_size": 24, "segment": "entropy"},
        {"mode": "best_of_n", "weights": w, "num_candidates": 16},
        {"mode": "best_of_n", "weights": {}, "rewards": rw, "num_candidates": 8},
        # block K=4 by the scorer alone at other block sizes (the half-compute target fixes K, not M)
        {"mode": "block", "weights": w, "num_candidates": 4, "block_size": 4, "segment": "fixed"},
        {"mode": "block", "weights": w, "num_candidates": 4, "block_size": 24, "segment": "entropy"},
        # few long blocks by the reward: each selection costs KL, so fewer of them nearer best-of-N's curve
        {"mode": "block", "weights": {}, "rewards": rw, "num_candidates": 2, "block_size": 24, "segment": "fixed"},
        {"mode": "block", "weights": {}, "rewards": rw, "num_candidates": 2, "block_size": 16, "segment": "fixed"},
        {"mode": "block", "weights": {}, "rewards": rw, "num_candidates": 2, "block_size": 8, "segment": "fixed"},
        {"mode": "block", "weights": {}, "rewards": rw, "num_candidates": 4, "block_size": 24, "segment": "fixed"},
    ]
    if quick:
        runs = [r for r in runs if r.get("num_candidates", 1) <= 8 and "max_tokens" not in r]
    return [{**r, "issue": True} for r in runs]


def sweep_plan(strength: float) -> list[dict]:
    """positive/concise weights in token mode. (1, 0) is the token run steering positive alone at
    this strength (same request, same seeds), so the sweep reuses it instead of running it again."""
    return [{"mode": "token", "weights": {"positive": round(a, 2), "concise": round(1 - a, 2)},
             "strength": strength, "top_k": DEFAULT_TOP_K, "sweep": True} for a in (0.75, 0.5, 0.25, 0.0)]


CONTROL_FIELDS = ("mode", "weights", "strength", "top_k", "tail", "plausibility", "block_size", "num_candidates",
                  "selection", "rewards", "segment", "prune_every", "keep_fraction")
REQUEST_FIELDS = ("samples_per_prompt", "max_tokens")  # `n` and max_tokens of the request, when not the default


def run_key(run: dict) -> str:
    """A run's identity: its control and request settings (a stored result carries more fields)."""
    return json.dumps({k: run[k] for k in CONTROL_FIELDS + REQUEST_FIELDS if k in run}, sort_keys=True)


# -- talking to the server -----------------------------------------------------------------------
async def one_request(client, model: str, prompt: str, seed: int, control: dict, args,
                      n: int = 1, max_tokens: int | None = None) -> list[dict]:
    """One chat request; its n choices (plain samples: choice j draws from generator row j, the
    rows best_of_n's candidates use, so the first N of them are best_of_n N's candidates)."""
    r = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens or args.max_tokens,
        temperature=args.temperature, seed=seed, n=n, extra_body={"control": control})
    tokens = [r.usage.completion_tokens] if n == 1 else [None] * n  # usage is summed over choices
    out = []
    for choice, t in zip(sorted(r.choices, key=lambda c: c.index), tokens):
        extra = choice.model_extra or {}
        out.append({"text": choice.message.content or "", "completion_tokens": t, "control": extra.get("control"),
                    "finish_reason": choice.finish_reason})
    return out


async def run_once(client, model: str, prompts: list[dict], run: dict, args) -> dict:
    control = {k: v for k, v in run.items() if k in CONTROL_FIELDS}
    n = run.get("samples_per_prompt", 1)
    sem = asyncio.Semaphore(max(1, args.concurrency // n))

    async def go(i, p):
        async with sem:
            return await one_request(client, model, p["prompt"], args.seed + i, control, args, n=n,
                                     max_tokens=run.get("max_tokens"))

    t0 = time.perf_counter()
    per_prompt = await asyncio.gather(*(go(i, p) for i, p in enumerate(prompts)))
    seconds = time.perf_counter() - t0
    if n > 1:
        return samples_result(run, prompts, per_prompt, seconds)
    answers = [a[0] for a in per_prompt]
    texts = [a["text"] for a in answers]
    rewards = score_texts(texts, list(HEADS.values()))
    kl = [(a["control"] or {}).get("kl", 0.0) for a in answers]
    gen = [(a["control"] or {}).get("tokens_generated", 0) or a["completion_tokens"] for a in answers]
    comp = [max(1, a["completion_tokens"]) for a in answers]
    return {
        **run, "n": len(prompts), "seconds": round(seconds, 1), "head_rewards": HEADS,
        "reward": {h: statistics.fmean(rewards[r]) for h, r in HEADS.items()},
        "reward_sem": {h: statistics.stdev(rewards[r]) / len(texts) ** 0.5 for h, r in HEADS.items()},
        "kl": statistics.fmean(kl), "tokens_per_accepted": sum(gen) / sum(comp),
        "completion_tokens": statistics.fmean(comp),
        "scorer_values": {h: statistics.fmean((a["control"] or {}).get("values", {}).get(h, 0.0) for a in answers)
                          for h in HEADS},
        "samples": [{"prompt": p["prompt"], "text": a["text"], "completion_tokens": a["completion_tokens"],
                     "finish_reason": a["finish_reason"], "control": a["control"]}
                    for p, a in zip(prompts, answers)],
    }


def samples_result(run: dict, prompts: list[dict], per_prompt: list[list[dict]], seconds: float) -> dict:
    """N plain samples per prompt, every one kept with its true rewards and the scorer's values
    (the server's `control` of each choice): the true-reward best-of-N baseline, scorer-ranked
    best-of-N recomputed client-side, and the base distributions behind the measured KL."""
    texts = [a["text"] for answers in per_prompt for a in answers]
    rewards = score_texts(texts, list(HEADS.values()))
    it = iter(range(len(texts)))
    per = []
    for p, answers in zip(prompts, per_prompt):
        idx = [next(it) for _ in answers]
        per.append({"prompt": p["prompt"], "texts": [a["text"] for a in answers],
                    "finish_reasons": [a["finish_reason"] for a in answers],
                    "controls": [a["control"] for a in answers],
                    "rewards": {h: [rewards[r][i] for i in idx] for h, r in HEADS.items()}})
    first = [a[0] for a in per_prompt]
    return {**run, "n": len(prompts), "seconds": round(seconds, 1), "head_rewards": HEADS,
            "reward": {h: statistics.fmean(rewards[r]) for h, r in HEADS.items()},
            "reward_sem": {h: statistics.stdev(rewards[r]) / len(texts) ** 0.5 for h, r in HEADS.items()},
            "kl": 0.0, "tokens_per_accepted": 1.0,
            "completion_tokens": statistics.fmean((a["control"] or {}).get("tokens_generated", 0) for a in first),
            "samples": [], "per_prompt": per}


def scorer_identity(spec: str) -> str:
    """The `--scorer` setting's `scorer_id` ('default' is the shipped checkpoint; 'untrained' is
    built by the server, and named as such)."""
    if spec == "untrained":
        return spec
    from cdserve.scorer_store import SHIPPED_DEFAULT

    return scorer_id(SHIPPED_DEFAULT if spec == "default" else spec)


def start_server(args) -> tuple[subprocess.Popen, str]:
    flags = ["--backend", args.backend, "--scorer", args.scorer, "--max-batch-rows", str(args.max_batch_rows),
             "--max-n", str(max(16, SAMPLES))]
    threads = int(os.environ.get("OMP_NUM_THREADS", args.threads))
    return start_cdserve(flags, threads, HERE / "results" / "quality_server.log", args.start_timeout)


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


# -- reporting -----------------------------------------------------------------------------------
def steered_head(r: dict) -> str:
    """The head a run steers: its first weight, or the head whose reward it ranks by."""
    if r["weights"]:
        return next(iter(r["weights"]))
    by_reward = {reward: head for head, reward in HEADS.items()}
    return by_reward.get(next(iter(r.get("rewards") or {})), next(iter(HEADS)))


def plot_reward_vs_kl(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in results if r["mode"] == "none")
    heads = [h for h in HEADS if any(r["mode"] != "none" and steered_head(r) == h and not r.get("sweep")
                                     for r in results)]
    if not heads:  # plain decoding alone (`--only 'none;<issue runs>'` into a new --out): nothing to plot
        return
    cols = 2 if len(heads) > 1 else 1
    rows = (len(heads) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    style = {"token (top 20)": ("tab:blue", "o"), "token (top 100)": ("tab:purple", "v"),
             "token (all tokens)": ("tab:cyan", "D"), f"token ({top_k_words(DEFAULT_TOP_K, 'keep')})": ("tab:pink", "P"),
             "block": ("tab:orange", "s"), "best_of_n": ("tab:green", "^")}
    curve = lambda r: f"token ({token_words(r)})" if r["mode"] == "token" else r["mode"]
    for ax, head in zip(axes.flat, heads):
        for mode, (color, marker) in style.items():
            pts = sorted((r["kl"], r["reward"][head], r["reward_sem"][head]) for r in results
                         if curve(r) == mode and not r.get("sweep") and steered_head(r) == head)
            if pts:
                xs, ys, es = zip(*([(0.0, base["reward"][head], base["reward_sem"][head])] + pts))
                ax.errorbar(xs, ys, yerr=es, color=color, marker=marker, capsize=2, label=mode)
        ax.axhline(base["reward"][head], color="grey", ls=":", lw=1)
        ax.set_title(f"{head} ({HEADS[head]})")
        ax.set_xlabel("KL from base (nats per answer)")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=0)
        ax.set_ylabel(f"mean true {head} reward")
        ax.legend(fontsize=8)
    fig.suptitle(f"Steering one head at a time, {base['n']} held-out prompts (error bars: 1 s.e.)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sweep_points(results)
    if not sweep:
        return
    base = next(r for r in results if r["mode"] == "none")
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    xs = [r["reward"]["concise"] for r in sweep]
    ys = [r["reward"]["positive"] for r in sweep]
    ax.errorbar(xs, ys, xerr=[r["reward_sem"]["concise"] for r in sweep],
                yerr=[r["reward_sem"]["positive"] for r in sweep], fmt="o-", color="tab:purple", capsize=2,
                label=f"token mode ({top_k_words(sweep[0]['top_k'])}), strength {sweep[0]['strength']:g}")
    for r, x, y in zip(sweep, xs, ys):
        ax.annotate(f"w+={r['weights']['positive']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([base["reward"]["concise"]], [base["reward"]["positive"]], "k*", ms=10, label="none (base)")
    ax.set_xlabel("mean true concise reward")
    ax.set_ylabel("mean true positive reward")
    ax.set_title(f"positive vs concise: one scorer, weights swept ({sweep[0]['n']} prompts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[dict], command: str, meta: dict) -> str:
    heads = list(HEADS)
    lines = [
        "## Quality: reward vs KL per control mode", "",
        (f"Produced by `{command}` ({meta['date']}, {meta['backend']} backend, scorer `{meta['scorer']}`, "
        f"{meta['n']} held-out prompts, max_tokens {meta['max_tokens']}, temperature {meta['temperature']}, "
        f"seeds {meta['seed']}..{meta['seed'] + meta['n'] - 1}; {meta['machine']}). True rewards from "
        "`prefix_scorers.rewards`; KL as the server reports it (token: exact per-step sum; block and "
        "best_of_n: the bound log K - (K-1)/K per selection)."), "",
        "![reward vs KL](quality_reward_vs_kl.png)", "",
        "![positive vs concise](quality_weights_sweep.png)", "",
        "Mean true reward per head (columns) for each run; `steered` is the weights sent.", "",
        "| run | steered | " + " | ".join(heads) + " | KL | gen/accepted | s |",
        "|---|---|" + "---|" * len(heads) + "---|---|---|",
    ]
    for r in results:
        head = "-" if r["mode"] == "none" else ", ".join(f"{k}={v:g}" for k, v in r["weights"].items())
        cells = [f"{r['reward'][h]:.3f}" for h in heads]
        lines.append(f"| {label(r)} | {head} | " + " | ".join(cells) +
                     f" | {r['kl']:.2f} | {r['tokens_per_accepted']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------
async def main_async(args) -> None:
    from openai import AsyncOpenAI

    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    cache = {run_key(r): r for r in json.loads(out.read_text())["runs"]} if out.exists() and not args.fresh else {}
    prompts = spread(load_prompts("eval"), args.prompts)
    heads = args.heads.split(",")
    issue = issue_plan(heads[0], HEADS[heads[0]], args.quick) if args.issue_runs else []
    runs = plan(args.quick, heads) + (sweep_plan(args.sweep_strength) if "concise" in HEADS else []) + issue
    scorer = scorer_identity(args.scorer)
    ok = lambda r: reusable(cache.get(run_key(r)), r, len(prompts), scorer)
    todo = [r for r in (named(runs, args.only) if args.only else runs) if not ok(r)]
    if not args.only:
        # the base run, the issue runs (in their order), the first head, then the sweep, then the
        # other heads: an interrupted run has the comparisons that matter most
        todo.sort(key=lambda r: (r["mode"] != "none" or "issue" in r, 0 if "issue" in r else
                                 bool(r.get("sweep")) and 2 or (3 if steered_head(r) != heads[0] else 1)))
    proc = None
    if todo and not args.url:
        proc, args.url = start_server(args)
    try:
        if todo:
            client = AsyncOpenAI(base_url=args.url + "/v1", api_key=os.environ.get("CDSERVE_API_KEY", "none"),
                                 timeout=3600, max_retries=0)
            model = (await client.models.list()).data[0].id
            import openai

            for i, run in enumerate(todo):
                try:
                    res = await run_once(client, model, prompts, run, args)
                except openai.BadRequestError as e:  # e.g. a segment this server does not have yet
                    print(f"[{i + 1}/{len(todo)}] {label(run)}: refused, skipped: {e}", flush=True)
                    continue
                res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                res["scorer_id"] = scorer
                cache[run_key(run)] = res
                print(f"[{i + 1}/{len(todo)}] {label(res):22s} {json.dumps(run['weights'])} "
                      + " ".join(f"{h}={res['reward'][h]:.3f}" for h in HEADS)
                      + f" kl={res['kl']:.2f} gen/acc={res['tokens_per_accepted']:.2f} {res['seconds']:.0f}s",
                      flush=True)
                meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "backend": args.backend,
                        "scorer": args.scorer, "scorer_id": scorer, "n": len(prompts), "max_tokens": args.max_tokens,
                        "temperature": args.temperature, "seed": args.seed,
                        "machine": f"{os.cpu_count()} CPU cores, shared"}
                kept = [r for r in cache.values() if r["n"] == len(prompts)]  # drop runs of another size
                out.write_text(json.dumps({"meta": meta, "runs": kept}, indent=1) + "\n")
    finally:
        if proc is not None:
            stop_server(proc)
    data = json.loads(out.read_text())
    # only this scorer's runs (and those no scorer affects): runs of two scorers are never mixed
    results = [with_rewards(cache[run_key(r)], HEADS) for r in runs if ok(r) and "issue" not in r]
    if any(r["mode"] == "none" for r in results):  # the plots' reference point (absent: --fresh --only)
        plot_reward_vs_kl(results, HERE / "quality_reward_vs_kl.png")
        plot_sweep(results, HERE / "quality_weights_sweep.png")
    else:
        print("no plain run (none) among these results: plots not drawn", flush=True)
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = HERE / "results" / "quality_table.md"  # findings are written up in RESULTS.md
    # Hand-written findings below the table survive a rerun.
    old = md.read_text() if md.exists() else ""
    findings = old[old.index(FINDINGS):] if FINDINGS in old else ""
    md.write_text(table(results, command.strip(), data["meta"]) + ("\n" + findings if findings else ""))
    print(f"wrote {out}, {HERE / 'quality_reward_vs_kl.png'}, {HERE / 'results' / 'quality_table.md'}")
    if args.report:
        from benchmarks.quality.report import write_report

        write_report(out, perplexity=args.perplexity)
        print(f"wrote {HERE / 'results' / 'quality_report.md'}, {HERE / 'quality_reward_vs_measured_kl.png'}, "
              f"{HERE / 'quality_reward_vs_compute.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help=f"a running server (default: start one); its --max-n must be at least {SAMPLES} "
                    "for the plain-samples run")
    ap.add_argument("--out", default=str(HERE / "results" / "quality.json"), help="results JSON (the run cache)")
    ap.add_argument("--backend", default="hf")
    ap.add_argument("--scorer", default="default")
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts per run")
    ap.add_argument("--heads", default="positive,specific,concise,readable", help="heads to steer, one at a time")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--sweep-strength", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-batch-rows", type=int, default=64)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the server it starts")
    ap.add_argument("--quick", action="store_true", help="fewer settings (a smoke run)")
    ap.add_argument("--no-report", dest="report", action="store_false",
                    help="skip the GRUE-style report (benchmarks/quality/report.py) at the end")
    ap.add_argument("--no-perplexity", dest="perplexity", action="store_false",
                    help="report without the base model's perplexity of the answers (slow on CPU)")
    ap.add_argument("--no-issue-runs", dest="issue_runs", action="store_false",
                    help="skip the plain samples, reward-in-the-loop and pruned runs (issues 14/15)")
    ap.add_argument("--fresh", action="store_true", help="ignore cached runs")
    ap.add_argument("--only", default="", help="run only these runs, in this order: their names as in the "
                    "report's table, ';'-separated (e.g. 'none;token s=1 top_k=20 [specific=1]')")
    args = ap.parse_args()
    if args.quick:
        args.prompts = min(args.prompts, 8)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
