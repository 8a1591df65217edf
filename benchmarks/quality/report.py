"""The GRUE-style report of the quality benchmark, built from its stored runs (results/quality.json).

For every run: the true reward per head, the independent judge (AFINN), fluency (non-words,
repetition, distinct-2, perplexity under the base model), KL as the server reports it and as
measured (benchmarks/quality/kl.py), and compute (base tokens per answer token, wall time).
Rows computed client-side from the plain samples (16 per prompt, the same seeds as every server
run): best-of-N ranked by the true reward itself, and scorer-ranked best-of-N recomputed from the
scorer values the server returned with each sample. Then the issues' targets, met or not, and
two plots: reward vs measured KL and reward vs base tokens per answer token.

Runs of one scorer only: when the cache names its scorer (`meta.scorer_id`), a run that depends on
the scorer (benchmarks/quality/runs.py, `uses_scorer`) but ran with another is left out (listed
under the targets), and the samples' scorer values rank nothing unless they are that scorer's.

    python -m benchmarks.quality.report            # after python benchmarks/quality.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
from pathlib import Path

from benchmarks.quality import judges
from benchmarks.quality.kl import (
    best_of_n_kl,
    best_of_n_kl_bound,
    effective_kl,
    effective_n,
    pool_rank,
    rank_mixture_kl,
    winner_rank,
    winners_kl,
)
from benchmarks.quality.runs import (
    DEFAULT_STRENGTH,
    DEFAULT_TOP_K,
    SCORER_IN_REWARD_UNITS,
    token_words,
    top_k_words,
)
from prefix_scorers.checkpoint import DEFAULT_HEADS

HERE = Path(__file__).resolve().parent.parent
RESULTS = HERE / "results"
HEADS = tuple(h.name for h in DEFAULT_HEADS)  # the default scorer's heads
HEAD = "positive"
NS = (2, 4, 8, 16, 32, 64)


# -- rows ----------------------------------------------------------------------------------------
def row(label: str, family: str, answers: list[dict], rewards: dict[str, list[float]], kl_reported: float | None,
        kl_measured: float | None, kl_how: str, gen_per_answer: float, seconds: float | None, **extra) -> dict:
    """One run's report line; `answers` are {prompt, text} in prompt order."""
    return {"label": label, "family": family, "answers": answers,
            "reward": {h: statistics.fmean(v) for h, v in rewards.items()},
            "reward_sem": {h: statistics.stdev(v) / len(v) ** 0.5 for h, v in rewards.items()},
            "positive_per_answer": rewards[HEAD],
            "kl_reported": kl_reported, "kl_measured": kl_measured, "kl_how": kl_how,
            "gen_per_answer": gen_per_answer, "seconds": seconds, **extra}


def sample_tokens(control: dict | None, finish: str | None) -> tuple[int, int]:
    """(tokens the base model sampled, answer tokens) of one plain sample (EOS is sampled, not kept)."""
    gen = (control or {}).get("tokens_generated", 0)
    return gen, gen - (finish == "stop")


def client_rows(samples: dict, ns=NS, heads=HEADS, rankings=("reward", "scorer")) -> list[dict]:
    """True-reward and scorer-ranked best-of-N from the plain samples, first N of each prompt's samples
    (the rows best_of_n N's candidates use); the rewards of `heads` are reported."""
    per = samples["per_prompt"]
    rows = []
    for rank_by in rankings:
        for n in ns:
            win, pools_r, pools_s, gen, acc = [], [], [], 0, 0
            for p in per:
                score = p["rewards"][HEAD] if rank_by == "reward" else [c["combined"] for c in p["controls"]]
                j = max(range(n), key=lambda k: score[k])  # the first of tied candidates, as cdserve
                win.append(j)
                pools_r.append(p["rewards"][HEAD])
                pools_s.append([c["combined"] for c in p["controls"]])
                g = [sample_tokens(p["controls"][k], p["finish_reasons"][k]) for k in range(n)]
                gen += sum(x for x, _ in g)
                acc += g[j][1]
            pool = pools_r if rank_by == "reward" else pools_s
            winners = [pool[i][j] for i, j in enumerate(win)]
            kl = statistics.fmean(best_of_n_kl(pl, n) for pl in pool)
            label = (f"true-reward best-of-{n} (client)" if rank_by == "reward"
                     else f"scorer-ranked best-of-{n} (client, recomputed)")
            mc = ({"kl_monte_carlo": winners_kl(winners, [pl[n:] for pl in pool], n)}
                  if len(pool[0]) - n >= 4 else {})  # each winner against the samples that were not its candidates
            rows.append(row(
                label, "true-reward best-of-N" if rank_by == "reward" else "scorer best-of-N (client)",
                [{"prompt": p["prompt"], "text": p["texts"][j]} for p, j in zip(per, win)],
                {h: [p["rewards"][h][j] for p, j in zip(per, win)] for h in heads},
                best_of_n_kl_bound(n), kl, f"plug-in best-of-N over {len(per[0]['texts'])} base samples",
                gen / max(1, acc),
                samples["seconds"] * n / len(per[0]["texts"]), n=n, rank_by=rank_by, **mc))
    return rows


def with_head_rewards(samples: dict, head_rewards: dict[str, str]) -> dict:
    """The samples run with every head's per-sample rewards: the heads it lacks or stored under
    another reward (runs.stale_heads) are scored from its texts."""
    from benchmarks.quality.runs import stale_heads

    per = samples["per_prompt"]
    had = {"head_rewards": samples["head_rewards"]} if "head_rewards" in samples else {}
    missing = {h: r for p in per for h, r in stale_heads({**had, "rewards": p["rewards"]}, head_rewards).items()}
    if not missing:
        return samples
    from prefix_scorers.rewards import score_texts

    scored = score_texts([t for p in per for t in p["texts"]], list(missing.values()))
    out, i = [], 0
    for p in per:
        n = len(p["texts"])
        out.append({**p, "rewards": {**p["rewards"], **{h: scored[r][i:i + n] for h, r in missing.items()}}})
        i += n
    return {**samples, "head_rewards": {**samples.get("head_rewards", {}), **head_rewards}, "per_prompt": out}


def _find(texts: list[str], text: str, n: int) -> int | None:
    return next((k for k in range(n) if texts[k] == text), None)


def family(run: dict) -> str:
    mode = run["mode"]
    if "max_tokens" in run:
        return f"{mode} at {run['max_tokens']} tokens"
    if mode == "token":
        return f"token ({token_words(run, DEFAULT_TOP_K)})"
    if mode == "block":
        if not run.get("rewards"):
            return "block (scorer)"
        by = "reward + scorer" if run["weights"] else "reward in the loop"  # weights {}: the reward alone
        return f"block, {by} ({run.get('segment', 'fixed')})"
    if mode == "best_of_n":
        by = "reward" if run.get("rewards") else "scorer"
        return f"pruned best-of-N ({by})" if run.get("prune_every") else f"best_of_n ({by}, server)"
    return mode


def server_row(run: dict, samples: dict | None, head_rewards: dict[str, str], block_kl: dict | None = None,
               scorer_values_ok: bool = True) -> dict:
    """A server run; best_of_n's measured KL from the plain samples of the same prompts and seeds
    (by the scorer: only if the samples' values are this run's scorer's, `scorer_values_ok`),
    block mode's from extra base samples per block (block_kl.py: results/quality_block_kl.json),
    used only for the run it measured (same answers' prompts, same reported KL)."""
    from benchmarks.quality.runs import label, name, scorer_label  # the run's name in every table
    from prefix_scorers.rewards import score_texts

    answers = [{"prompt": a["prompt"], "text": a["text"]} for a in run["samples"]]
    scored = score_texts([a["text"] for a in answers], list(head_rewards.values()))
    rewards = {h: scored[r] for h, r in head_rewards.items()}
    extra: dict = {}
    fam, mode, n = family(run), run["mode"], run.get("num_candidates", 1)
    if mode == "none":
        measured, how = 0.0, "plain decoding"
    elif mode == "token":
        measured, how = run["kl"], "exact per-step sum (server)"
    elif mode == "block":
        m = (block_kl or {}).get(scorer_label(run)) or (block_kl or {}).get(label(run))  # label only: before scorer ids
        if (m and [p["prompt"] for p in m["per_answer"]] == [a["prompt"] for a in answers[:m["answers"]]]
                and math.isclose(m["kl_reported"], run["kl"], rel_tol=1e-9)):
            measured, extra["kl_measured_sem"] = m["kl_measured"], m["kl_measured_sem"]
            extra["kl_bound_blocks"], extra["kl_measured_answers"] = m["kl_bound"], m["answers"]
            how = (f"per-block best-of-{n} over {m['samples_per_block']} base samples of each block from its "
                   f"prefix, summed over blocks (block_kl.py), mean over the first {m['answers']} answers")
        else:
            measured, how = None, "bound only: no per-block base samples (python -m benchmarks.quality.block_kl)"
    elif samples is None or (run["weights"] if run.get("rewards") else run["weights"] != samples["weights"]) \
            or (run.get("rewards") and list(run["rewards"]) != [head_rewards[HEAD]]):
        measured, how = None, "bound only: no base samples for this ranking score"
    elif not run.get("rewards") and not scorer_values_ok:
        measured, how = None, "bound only: the samples' scorer values are another scorer's"
    elif len(samples["per_prompt"][0]["texts"]) < n:
        measured, how = None, f"bound only: fewer base samples than N={n}"
    else:
        per = samples["per_prompt"]
        by_reward = bool(run.get("rewards"))
        pools = [p["rewards"][HEAD] if by_reward else [c["combined"] for c in p["controls"]] for p in per]
        found = [_find(p["texts"], a["text"], n) for p, a in zip(per, answers)]
        extra["winners_among_samples"] = sum(k is not None for k in found) / len(found)
        client = [max(range(n), key=lambda k, pl=pl: pl[k]) for pl in pools]
        extra["same_as_client_best_of_n"] = sum(k == c for k, c in zip(found, client)) / len(found)
        if run.get("prune_every"):
            extra["kl_upper"] = math.log(n)
            if extra["winners_among_samples"] == 1.0:
                ranks = [winner_rank(pl[:n], pl[k]) for pl, k in zip(pools, found)]
                measured = rank_mixture_kl(ranks, n)
                how = "rank mixture over its own N candidates: the final score's KL (a lower bound; log N the upper)"
                extra["winner_rank_mean"] = statistics.fmean(ranks)
            else:  # its candidates are not the samples' seeds: rank the winners among the samples
                won = rewards[HEAD] if by_reward else [a["control"]["combined"] for a in run["samples"]]
                a = effective_n([pool_rank(pl, w) for pl, w in zip(pools, won)], len(pools[0]))
                measured, extra["effective_n"] = effective_kl(a), a
                how = (f"best-of-a law fitted to the winners' ranks among the {len(pools[0])} samples (a = {a:.2f}): "
                       "model-based; log N the upper bound")
        else:
            measured = statistics.fmean(best_of_n_kl(pl, n) for pl in pools)
            how = f"plug-in best-of-N over {len(pools[0])} base samples"
            # Monte Carlo check: each winner against the samples that were not its candidates
            hits = [(pl[k], pl[n:]) for pl, k in zip(pools, found) if k is not None]
            if hits and len(pools[0]) - n >= 4:
                extra["kl_monte_carlo"] = winners_kl([w for w, _ in hits], [pl for _, pl in hits], n)
    return row(name(run), fam, answers, rewards, run["kl"], measured, how, run["tokens_per_accepted"],
               run["seconds"], run=run_settings(run), **extra)


def run_settings(run: dict) -> dict:
    skip = {"samples", "per_prompt", "reward", "reward_sem", "scorer_values", "n", "seconds", "kl",
            "tokens_per_accepted", "completion_tokens", "date", "issue"}
    return {k: v for k, v in run.items() if k not in skip}


def add_judges(rows: list[dict], ppl: judges.Perplexity | None) -> None:
    for r in rows:
        texts = [a["text"] for a in r["answers"]]
        af = judges.afinn_scores(texts)
        r["afinn"] = statistics.fmean(af)
        r["afinn_sem"] = statistics.stdev(af) / len(af) ** 0.5
        r["afinn_per_answer"] = af
        r["nonword_share"] = judges.nonword_share(texts)
        r["nonword_per_answer"] = [judges.nonword_share([t]) for t in texts]
        r["repetition_per_answer"] = [judges.repetition(t) for t in texts]
        r["repetition"] = statistics.fmean(r["repetition_per_answer"])
        r["distinct_2"] = judges.distinct_2(texts)
        r["words"] = statistics.fmean(len(t.split()) for t in texts)
        if ppl is not None and r.get("perplexity_wanted", True):
            r["perplexity"] = ppl.perplexity([(a["prompt"], a["text"]) for a in r["answers"]])


# -- targets -------------------------------------------------------------------------------------
def _prompt_bootstrap(rows: list[dict], stat, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile-bootstrap interval of stat(mean reward of each row) over the prompts the rows
    share, resampling prompts (the same picks for every row: paired); stat may return None to skip."""
    per = [{a["prompt"]: v for a, v in zip(r["answers"], r["positive_per_answer"])} for r in rows]
    prompts = [p for p in per[0] if all(p in d for d in per[1:])]
    rng, values = random.Random(seed), []
    for _ in range(resamples):
        pick = [rng.choice(prompts) for _ in prompts]
        v = stat(*(statistics.fmean(d[p] for p in pick) for d in per))
        if v is not None:
            values.append(v)
    values.sort()
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def gain_share_interval(none: dict, best: dict, ranked: dict, resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """95% interval of (ranked - none) / (best - none), the mean rewards of three rows: how far the
    ranker's share of the true-reward gain can move with another draw of as many prompts."""
    return _prompt_bootstrap([none, best, ranked], lambda n, b, r: (r - n) / (b - n) if b != n else None,
                             resamples, seed)


def paired_interval(a: dict, b: dict, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of a - b, the first head's reward of two rows on the same prompts
    and seeds (paired)."""
    return _prompt_bootstrap([a, b], lambda x, y: x - y, resamples, seed)


def curve_interval(run: dict, curve: list[tuple[float, dict]], x: float, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float] | None:
    """95% interval of run minus a best-of-N curve at x (inside it), paired over prompts: the curve
    there is the mixture of its two neighbouring rows (weights by x between their KLs), a policy
    that reaches it (mixing never adds KL: KL is convex). curve: (KL, row), (0, none) included."""
    pts = sorted(curve, key=lambda c: c[0])
    for (x0, r0), (x1, r1) in itertools.pairwise(pts):
        if x0 <= x <= x1 and x1 > x0:
            a = (x - x0) / (x1 - x0)
            return _prompt_bootstrap([run, r0, r1], lambda v, lo, hi, a=a: v - ((1 - a) * lo + a * hi),
                                     resamples, seed)
    return None


def _pick(rows: list[dict], label: str) -> dict | None:
    return next((r for r in rows if r["label"] == label), None)


def _curve_at(points: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation of a (x, y) curve sorted by x, held at its last y beyond it."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
    return points[-1][1]


def _less_fluent(rows: list[dict], none: dict) -> list[str]:
    """The runs whose non-words or repetition per answer is above plain decoding's by more than
    2 standard errors of the difference, with the numbers."""
    worse = []
    for r in rows:
        for m in ("nonword", "repetition"):
            d = statistics.fmean(r[f"{m}_per_answer"]) - statistics.fmean(none[f"{m}_per_answer"])
            se = math.hypot(_sem(r[f"{m}_per_answer"]), _sem(none[f"{m}_per_answer"]))
            if d > 2 * se:
                worse.append(f"{r['label']} ({m} {statistics.fmean(r[f'{m}_per_answer']):.3f}, +{d:.3f} > 2 s.e.)")
    return worse


def _vs_curve(d: float, past: bool) -> str:
    """A run's distance to a best-of-N curve; `past`: beyond its last point, where only a lower
    bound of the curve is known (a run below it is below the curve by more; above it, undecided)."""
    if not past:
        return f"{d:+.3f}"
    return f"{d:+.3f} or less (past the curve)" if d < 0 else f"{d:+.3f} vs its last point (past the curve: undecided)"


def _fmt(x: float | None, d: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def targets(rows: list[dict], runs: list[dict]) -> list[dict]:
    """Each target of issues 14 and 15 that this benchmark measures: met or not, with the numbers."""
    out = []

    def add(issue: str, name: str, met: bool | None, detail: str) -> None:
        out.append({"issue": issue, "target": name, "met": met, "detail": detail})

    none = _pick(rows, "none")
    tr = {n: _pick(rows, f"true-reward best-of-{n} (client)") for n in NS}
    tr = {n: r for n, r in tr.items() if r}
    base = none["reward"][HEAD]
    tr8 = tr.get(8)
    srv8 = _pick(rows, "best_of_n N=8") or _pick(rows, "scorer-ranked best-of-8 (client, recomputed)")
    if srv8 and tr8:
        share = (srv8["reward"][HEAD] - base) / (tr8["reward"][HEAD] - base)
        lo, hi = gain_share_interval(none, tr8, srv8)
        add("14", "scorer-ranked best-of-8 reaches >= 90% of true-reward best-of-8's gain over plain decoding",
            share >= 0.9, f"gain {srv8['reward'][HEAD] - base:.3f} of {tr8['reward'][HEAD] - base:.3f} ({share:.0%}; "
            f"95% bootstrap interval over prompts {lo:.0%} to {hi:.0%})"
            + ("" if srv8["label"] == "best_of_n N=8" else "; client-side from the samples' scorer values (no server run)"))
    for lab, issue in (("block K=4 M=8", "14"), ("block K=4 M=4", "14"), ("block K=4 entropy segments (max 24)", "14"),
                       ("block K=4 M=8 reward-ranked", "15"),
                       ("block K=4 sentence segments (max 24) reward-ranked", "15"),
                       ("block K=4 entropy segments (max 24) reward-ranked", "15"),
                       (f"block K=4 M=8 reward-ranked [{HEAD}={SCORER_IN_REWARD_UNITS:g}]", "14"),
                       (f"block K=4 entropy segments (max 24) reward-ranked [{HEAD}={SCORER_IN_REWARD_UNITS:g}]", "14")):
        b = _pick(rows, lab)
        if b and tr8:
            ok = b["reward"][HEAD] >= tr8["reward"][HEAD] and b["gen_per_answer"] <= tr8["gen_per_answer"] / 2
            lo, hi = paired_interval(b, tr8)
            add(issue, f"{lab} reaches true-reward best-of-8's {HEAD} at half its base tokens or fewer", ok,
                f"{b['reward'][HEAD]:.3f} (s.e. {b['reward_sem'][HEAD]:.3f}) at {b['gen_per_answer']:.2f} base "
                f"tokens/answer token vs {tr8['reward'][HEAD]:.3f} at {tr8['gen_per_answer']:.2f} "
                f"(half: {tr8['gen_per_answer'] / 2:.2f}); paired difference "
                f"{b['reward'][HEAD] - tr8['reward'][HEAD]:+.3f}, 95% interval [{lo:+.3f}, {hi:+.3f}]")
    kl_rows = [(0.0, none)] + [(r["kl_measured"], r) for r in tr.values()]  # the curve's points, as rows
    curve_kl = [(x, r["reward"][HEAD]) for x, r in kl_rows]
    curve_gen = [(1.0, base)] + [(r["gen_per_answer"], r["reward"][HEAD]) for r in tr.values() if r]
    steered = [r for r in rows if r["family"].startswith(("token", "block")) and r["run"]["weights"].get(HEAD, 0) > 0
               and len(r["run"]["weights"]) == 1 or r["family"].startswith("block, reward")]
    # Past the curve's last point (true-reward best-of-64) its value is unknown but at least that
    # point's (best-of-N rises with N): a run below it there is below the curve by at least the
    # gap; one above it is undecided, never counted as reaching it.
    kl_end, last = max(x for x, _ in curve_kl), f"best-of-{max(tr)}" if tr else "plain decoding"
    at_kl = [(r, kl, r["reward"][HEAD] - _curve_at(curve_kl, kl), kl > kl_end)
             for r in steered for kl in [r["kl_measured"] if r["kl_measured"] is not None else r["kl_reported"]]]
    if at_kl:
        reached = [r for r, _, d, past in at_kl if d >= 0 and not past]
        inside = [(r, kl, d) for r, kl, d, past in at_kl if not past]
        best = ""
        if inside:  # the run nearest above (or least below) the curve, with a paired interval
            r, kl, d = max(inside, key=lambda x: x[2])
            ci = curve_interval(r, kl_rows, kl)
            best = (f"best: {r['label']} {d:+.3f} at KL {kl:.2f}"
                    + (f", paired 95% interval over prompts [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") + "; ")
        add("14", "at equal measured KL, token or block mode reaches true-reward best-of-N's reward",
            bool(reached), best + "; ".join(f"{r['label']}: {_vs_curve(d, past)}" for r, _, d, past in at_kl) +
            f" (reward minus the true-reward best-of-N curve at the same KL, measured up to {last}'s "
            f"{kl_end:.2f}; past it, minus {last}'s reward, a lower bound of the curve there; block: measured "
            "per block where block_kl.py has run, else its bound)")
    gen_end = max(x for x, _ in curve_gen)
    at_gen = [(r, r["reward"][HEAD] - _curve_at(curve_gen, r["gen_per_answer"]), r["gen_per_answer"] > gen_end)
              for r in steered]
    if at_gen:
        add("14", "at equal base tokens per answer token, every steered mode beats true-reward best-of-N",
            all(d > 0 and not past for _, d, past in at_gen),
            "; ".join(f"{r['label']}: {_vs_curve(d, past)}" for r, d, past in at_gen) +
            " (reward minus the true-reward best-of-N curve at the same cost; best-of-1 = none)")
    c_none = _pick(rows, "none max_tokens=128")
    c_tok = _pick(rows, f"token default strength top_k={DEFAULT_TOP_K} max_tokens=128 [concise=1]")
    if c_none and c_tok:
        toks = {r["label"]: next(x for x in runs if run_settings(x) == r["run"])["completion_tokens"]
                for r in (c_none, c_tok)}  # the stored run of each row (the cache may hold other settings)
        ratio = toks[c_tok["label"]] / toks[c_none["label"]]
        add("14", "concise at the server's default strength: <= 0.8x the plain answer length at 128 max tokens",
            ratio <= 0.8, f"{toks[c_tok['label']]:.1f} vs {toks[c_none['label']]:.1f} answer tokens ({ratio:.2f}x); "
            f"words {c_tok['words']:.1f} vs {c_none['words']:.1f} ({c_tok['words'] / c_none['words']:.2f}x)")
    default_family = family({"mode": "token"})
    for head in HEADS:
        pts = sorted((r["run"]["weights"][head] * r["run"].get("strength", 0), r["reward"][head], r["reward_sem"][head])
                     for r in rows if r["family"] == default_family and list(r["run"]["weights"]) == [head])
        if len(pts) >= 2:
            pts = [(0.0, none["reward"][head], none["reward_sem"][head])] + pts
            ys = [y for _, y, _ in pts]
            strict = all(b > a for a, b in itertools.pairwise(ys))
            noisy = all(b > a - 2 * max(ea, eb) for (_, a, ea), (_, b, eb) in itertools.pairwise(pts))
            add("14", f"{head} reward rises monotonically with its weight ({default_family}, the server's default)", strict,
                " -> ".join(f"{y:.3f}" for y in ys) + f" at weight x strength {', '.join(f'{x:g}' for x, _, _ in pts)}"
                + ("" if strict else f"; {'within' if noisy else 'outside'} 2 s.e. where it falls"))
    pos = [r for r in rows if r["family"] != "none" and "afinn" in r]
    if len(pos) >= 3:
        rho = _spearman([r["reward"][HEAD] for r in pos], [r["afinn"] for r in pos])
        pairs = [(v, a) for r in pos for v, a in zip(r["positive_per_answer"], r["afinn_per_answer"])]
        corr = _pearson([v for v, _ in pairs], [a for _, a in pairs])
        add("14", "the independent judge (AFINN) rises with the trained reward (VADER)", rho > 0.5,
            f"Spearman over {len(pos)} runs {rho:.2f}; Pearson over {len(pairs)} answers {corr:.2f}")
    if none and "nonword_share" in none:
        judged = [r for r in rows if r is not none and "nonword_share" in r and "max_tokens" not in r.get("run", {})]
        worse = _less_fluent(judged, none)
        add("14", "fluency no worse than plain decoding within noise (non-words, repetition: 2 s.e.)", not worse,
            f"none: non-words {none['nonword_share']:.3f}, repetition {none['repetition']:.3f}, distinct-2 "
            f"{none['distinct_2']:.3f}, perplexity {_fmt(none.get('perplexity'), 2)}; worse: "
            + ("; ".join(worse) if worse else "none of the runs (perplexity: see the table)"))
        # the same test on what a request gets without control settings beyond its weights
        default = [r for r in judged if r["family"] == default_family and len(r["run"]["weights"]) == 1
                   and r["run"].get("strength") == DEFAULT_STRENGTH and not r["run"].get("plausibility")]
        if default:
            worse, heads = _less_fluent(default, none), ", ".join(h for r in default for h in r["run"]["weights"])
            add("14", f"fluency at the server's default token control (strength {DEFAULT_STRENGTH:g}, "
                f"{default_family}), each head", not worse,
                f"{len(default)} heads ({heads}); worse: " + ("; ".join(worse) if worse else "none"))
    for chk in (r for r in rows if r["family"] == "best_of_n (reward, server)" and "same_as_client_best_of_n" in r):
        n = chk["run"]["num_candidates"]
        add("15", f"best_of_n N={n} with the reward in the loop equals client-side true-reward best-of-{n} (same seeds)",
            chk["same_as_client_best_of_n"] == 1.0,
            f"{chk['same_as_client_best_of_n']:.0%} of answers identical; reward {chk['reward'][HEAD]:.3f} vs "
            + (f"{tr[n]['reward'][HEAD]:.3f} client-side" if n in tr else "-"))
    for n in (8, 16):
        for by in ("", " reward-ranked"):
            r = _pick(rows, f"best_of_n N={n}{by} pruned every 8 keep 0.5")
            if r and n in tr:
                ok = r["reward"][HEAD] >= tr[n]["reward"][HEAD] and r["gen_per_answer"] <= tr[n]["gen_per_answer"] / 2
                add("15", f"pruned best-of-{n} ({'reward' if by else 'scorer'}) reaches true-reward best-of-{n}'s "
                    "reward with at most half its base tokens", ok,
                    f"{r['reward'][HEAD]:.3f} at {r['gen_per_answer']:.2f} vs {tr[n]['reward'][HEAD]:.3f} at "
                    f"{tr[n]['gen_per_answer']:.2f} base tokens/answer token")
    return out


def _sem(xs: list[float]) -> float:
    return statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def _pearson(x: list[float], y: list[float]) -> float:
    return statistics.correlation(x, y)


def _spearman(x: list[float], y: list[float]) -> float:
    return statistics.correlation(_ranks(x), _ranks(y))


# -- output --------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = ("| run | " + " | ".join(HEADS) + " | AFINN | non-words | rep-3 | distinct-2 | ppl | "
            "KL reported | KL measured | base tok / answer tok | s |")
    lines = [head, "|" + "---|" * (len(HEADS) + 10)]
    for r in rows:
        cells = [f"{r['reward'][h]:.3f}" for h in HEADS]
        cells[0] += f" ± {r['reward_sem'][HEAD]:.3f}"
        kl_m = _fmt(r["kl_measured"], 2) if r["kl_measured"] is not None else "(bound)"
        if r.get("kl_measured_sem") is not None:
            kl_m += f" ± {r['kl_measured_sem']:.2f}" + (f" ({r['kl_measured_answers']} answers)"
                                                       if r["kl_measured_answers"] < len(r["answers"]) else "")
        if r.get("kl_upper"):
            kl_m = f"{kl_m} (<= {r['kl_upper']:.2f})"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {_fmt(r.get('afinn'), 2)} | "
                     f"{_fmt(r.get('nonword_share'))} | {_fmt(r.get('repetition'))} | {_fmt(r.get('distinct_2'))} | "
                     f"{_fmt(r.get('perplexity'), 2)} | {_fmt(r['kl_reported'], 2)} | {kl_m} | "
                     f"{r['gen_per_answer']:.2f} | {_fmt(r['seconds'], 0)} |")
    return "\n".join(lines) + "\n"


STYLE = {"true-reward best-of-N": ("black", "*", "-"), "scorer best-of-N (client)": ("tab:green", "^", ":"),
         "best_of_n (scorer, server)": ("tab:green", "^", "-"), "best_of_n (reward, server)": ("black", "x", ""),
         "token (top 20)": ("tab:blue", "o", "-"), "token (top 100)": ("tab:gray", "v", "-"),
         "token (all tokens)": ("tab:cyan", "D", "-"), f"token ({top_k_words(DEFAULT_TOP_K, 'keep')})": ("tab:pink", "P", "--"),
         f"token ({top_k_words(DEFAULT_TOP_K)}, plausibility 0.05)": ("tab:gray", "v", ""),
         f"token ({top_k_words(DEFAULT_TOP_K)}, plausibility 0.1)": ("dimgray", "1", ""),
         "block (scorer)": ("tab:orange", "s", "-"), "block, reward in the loop (fixed)": ("tab:red", "s", ""),
         "block, reward in the loop (sentence)": ("tab:purple", "P", ""),
         "block, reward in the loop (entropy)": ("tab:pink", "X", ""),
         "block, reward + scorer (fixed)": ("darkred", "s", ""),
         "block, reward + scorer (entropy)": ("darkmagenta", "X", ""),
         "pruned best-of-N (scorer)": ("tab:olive", "v", "-"), "pruned best-of-N (reward)": ("tab:brown", "v", "-")}


def plot(rows: list[dict], x: str, path: Path, title: str, xlabel: str, log: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    none = _pick(rows, "none")
    fig, ax = plt.subplots(figsize=(9.6, 5.0))
    for fam, (color, marker, ls) in STYLE.items():
        # pruned best-of-N's measured KL is a lower bound: a bar runs from it to its upper bound, log N
        pts = sorted((r[x] if r[x] is not None else r["kl_reported"], r["reward"][HEAD], r["reward_sem"][HEAD],
                      r[x] is None, r.get("kl_upper") if x == "kl_measured" else None)
                     for r in rows if r["family"] == fam and ("run" not in r or set(r["run"]["weights"]) <= {HEAD}))
        if not pts:
            continue
        xs, ys, es, bound, upper = zip(*pts)
        ranged = any(u is not None for u in upper)
        xerr = [[0.0] * len(xs), [u - v if u is not None else 0.0 for u, v in zip(upper, xs)]] if ranged else None
        note = " (KL: bound)" if all(bound) and x == "kl_measured" else " (KL: lower to upper bound)" if ranged else ""
        ax.errorbar(xs, ys, yerr=es, xerr=xerr, color=color, marker=marker, ls=ls or "none", capsize=2, ms=6,
                    mfc="none" if all(bound) or ranged else color, label=fam + note)
    ax.plot([1.0 if x == "gen_per_answer" else 0.0], [none["reward"][HEAD]], "k.", ms=12, label="none (plain)")
    if log:
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"mean true {HEAD} reward (VADER compound)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside: no point hidden
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build(results: Path, ppl_cache: Path | None) -> dict:
    from benchmarks.quality.runs import name, uses_scorer

    data = json.loads(results.read_text())
    scorer = data["meta"].get("scorer_id")  # None: a cache from before runs named their scorer
    ours = lambda r: scorer is None or r.get("scorer_id") == scorer
    samples = max((r for r in data["runs"] if r.get("samples_per_prompt")), default=None,
                  key=lambda r: r["samples_per_prompt"])  # the most plain samples: the longest baseline
    runs = [r for r in data["runs"] if not uses_scorer(r) or ours(r) or r is samples]
    left_out = [f"{name(r)} (scorer {r.get('scorer_id', 'not recorded')})" for r in data["runs"] if r not in runs]
    head_rewards = {h.name: h.reward for h in DEFAULT_HEADS}
    scorer_values_ok = samples is not None and ours(samples)  # else the samples rank by the reward only
    if samples:
        samples = with_head_rewards(samples, head_rewards)
    prompts = {tuple(a["prompt"] for a in r["samples"]) for r in runs if r.get("samples")}
    if samples:
        prompts.add(tuple(p["prompt"] for p in samples["per_prompt"]))
    if len(prompts) != 1:
        raise ValueError(f"{results}: runs over different prompt sets ({len(prompts)}); rerun with --fresh")
    block_path = Path(results).with_name("quality_block_kl.json")
    block_kl = json.loads(block_path.read_text()) if block_path.exists() else {}
    rows = [server_row(r, samples, head_rewards, block_kl, scorer_values_ok) for r in runs
            if not r.get("samples_per_prompt") and not r.get("sweep")]
    if samples:
        rows += client_rows(samples, [n for n in NS if n <= samples["samples_per_prompt"]],
                            rankings=("reward", "scorer") if scorer_values_ok else ("reward",))
    checks = {}
    if samples:
        none = next(r for r in runs if r["mode"] == "none" and "max_tokens" not in r and not r.get("samples_per_prompt"))
        same = [p["texts"][0] == a["text"] for p, a in zip(samples["per_prompt"], none["samples"])]
        checks["first_sample_is_the_none_answer"] = sum(same) / len(same)
    order = {f: i for i, f in enumerate(["none", *STYLE])}
    rows.sort(key=lambda r: (order.get(r["family"], 99), r["kl_reported"] or 0))
    for r in rows:  # perplexity (slow on CPU) for the first head's runs, the baselines and the length check
        r["perplexity_wanted"] = (r["family"] in ("none", "true-reward best-of-N") or "max_tokens" in r.get("run", {})
                                  or r.get("run", {}).get("rewards") or list(r.get("run", {}).get("weights", {})) == [HEAD])
    ppl = judges.Perplexity(ppl_cache) if ppl_cache else None
    add_judges(rows, ppl)
    return {"meta": data["meta"], "checks": checks, "rows": rows, "targets": targets(rows, runs),
            "left_out_other_scorer": left_out}


def write_report(results: Path, perplexity: bool = True, out: Path | None = None) -> dict:
    """results/quality_report.{json,md} and the two plots (benchmarks/), from the stored runs; `out`:
    all four in that folder instead (a report of another prompt set beside the committed one)."""
    rep = build(Path(results), RESULTS / "quality_perplexity_cache.json" if perplexity else None)
    reports, plots = (RESULTS, HERE) if out is None else (Path(out), Path(out))
    reports.mkdir(parents=True, exist_ok=True)
    slim = {**rep, "rows": [{k: v for k, v in r.items() if not k.endswith("per_answer") and k != "answers"}
                            for r in rep["rows"]]}
    (reports / "quality_report.json").write_text(json.dumps(slim, indent=1) + "\n")
    meta = rep["meta"]
    plot(rep["rows"], "kl_measured", plots / "quality_reward_vs_measured_kl.png",
         f"{HEAD}: reward vs measured KL, {meta['n']} held-out prompts, {meta['max_tokens']} tokens",
         "KL from the base model, nats per answer (measured; hollow: bound)", True)
    plot(rep["rows"], "gen_per_answer", plots / "quality_reward_vs_compute.png",
         f"{HEAD}: reward vs compute, {meta['n']} held-out prompts, {meta['max_tokens']} tokens",
         "base-model tokens sampled per answer token", True)
    md = ["| target | met | numbers |", "|---|---|---|"]
    md += [f"| ({t['issue']}) {t['target']} | {'yes' if t['met'] else 'no'} | {t['detail']} |" for t in rep["targets"]]
    scorer = f"Scorer `{meta['scorer']}` (scorer_id {meta['scorer_id']}). " if meta.get("scorer_id") else ""
    gone = ("Left out, run with another scorer: " + "; ".join(rep["left_out_other_scorer"]) + ".\n"
            if rep["left_out_other_scorer"] else "")
    (reports / "quality_report.md").write_text(scorer + "\n\n" * bool(scorer) + table(rep["rows"]) + "\n" +
                                               "\n".join(md) + "\n\n" + json.dumps(rep["checks"]) + "\n" +
                                               ("\n" + gone if gone else ""))
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS / "quality.json"))
    ap.add_argument("--no-perplexity", action="store_true", help="skip the base model's perplexity (slow on CPU)")
    ap.add_argument("--out-dir", help="write the report and its plots here (default: results/ and benchmarks/)")
    args = ap.parse_args()
    write_report(Path(args.results), not args.no_perplexity, args.out_dir and Path(args.out_dir))
    print((Path(args.out_dir) if args.out_dir else RESULTS).joinpath("quality_report.md").read_text())


if __name__ == "__main__":
    main()
