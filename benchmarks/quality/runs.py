"""Names of the quality benchmark's runs (one per control setting) and the scorer each depends on,
shared by the runner and the report."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cdserve.control.request import ControlConfig

HEAD = "positive"  # the head the benchmark steers first (the report's HEAD)
# The scorer steers by sum_h w_h (Q_h - mean_h) / std_h; the positive head's std of the final value
# is 0.38 (the default scorer's normalisation), so w = 0.4 gives ~Q - mean: reward units, like the
# reward it is added to in block mode with the reward in the loop.
SCORER_IN_REWARD_UNITS = 0.4
DEFAULT_TOP_K = ControlConfig().top_k  # the server's: token runs of every head use it
DEFAULT_STRENGTH = ControlConfig().strength  # the server's: every head runs at it
# The reward behind each head in runs stored before runs recorded theirs (`head_rewards`): the
# default scorers up to 44ed424 (`concise` counted words, `specific` repeated words too).
LEGACY_HEAD_REWARDS = {"positive": "vader_compound", "civil": "civility", "specific": "specificity",
                       "concise": "concise", "readable": "readable"}


def spread(prompts: list, n: int) -> list:
    """The benchmark's n held-out prompts: every len/n-th, spread over the categories."""
    return prompts[::max(1, len(prompts) // n)][:n]


def label(r: dict) -> str:
    suffix = "".join([f" max_tokens={r['max_tokens']}" if "max_tokens" in r else "",
                      " reward-ranked" if r.get("rewards") else "",
                      f" pruned every {r['prune_every']} keep {r['keep_fraction']:g}" if r.get("prune_every") else ""])
    if r["mode"] == "none":
        return (f"none x{r['samples_per_prompt']} samples" if "samples_per_prompt" in r else "none") + suffix
    if r["mode"] == "token":
        s = f"s={r['strength']:g}" if "strength" in r else "default strength"
        tail = f" tail={r['tail']}" if "tail" in r else ""
        held = f" plausibility={r['plausibility']:g}" if r.get("plausibility") else ""
        return f"token {s}" + (f" top_k={r['top_k']}" if "top_k" in r else "") + tail + held + suffix
    if r["mode"] == "block":
        seg = r.get("segment", "fixed")
        size = f"M={r['block_size']}" if seg == "fixed" else f"{seg} segments (max {r['block_size']})"
        return f"block K={r['num_candidates']} {size}" + suffix
    return f"best_of_n N={r['num_candidates']}" + suffix


def name(r: dict) -> str:
    """The label plus the weights in brackets when they are not the first head's alone: the
    run's name in the report's table and in `quality.py --only`."""
    if r["mode"] != "none" and r["weights"] and r["weights"] != {HEAD: 1.0}:
        return label(r) + " [" + ", ".join(f"{h}={w:g}" for h, w in r["weights"].items()) + "]"
    return label(r)


def top_k_words(top_k: int, tail: str = "drop") -> str:
    """How tables and plots name a token run's top_k (and its tail, when kept)."""
    return (f"top {top_k}" + (", tail kept" if tail == "keep" else "")) if top_k else "all tokens"


def token_words(run: dict, default_top_k: int = DEFAULT_TOP_K) -> str:
    """A token run's top_k, tail and plausibility in words (the server's defaults where the run
    sends none)."""
    held = f", plausibility {run['plausibility']:g}" if run.get("plausibility") else ""
    return top_k_words(run.get("top_k", default_top_k), run.get("tail", "drop")) + held


def scorer_label(r: dict) -> str:
    """The label, and the scorer the run ran with when it depends on one: the key of results
    measured on a run (block_kl.py), since the cache holds the same setting run with several scorers."""
    return label(r) + (f" @{r['scorer_id']}" if uses_scorer(r) and r.get("scorer_id") else "")


def uses_scorer(r: dict) -> bool:
    """Whether a run's outcome depends on the scorer: it steers or ranks by the scorer's weights,
    or (the plain samples) it stores the scorer's value of every sample. Plain decoding and runs
    with only a reward in the loop do not."""
    return bool(r.get("weights")) and (r["mode"] != "none" or bool(r.get("samples_per_prompt")))


def reusable(cached: dict | None, run: dict, n: int, scorer: str) -> bool:
    """A cached result stands for `run`: same number of prompts and, if the run depends on the
    scorer, the same scorer (a result stored without `scorer_id` ran with an unknown one)."""
    return cached is not None and cached["n"] == n and (not uses_scorer(run) or cached.get("scorer_id") == scorer)


def named(runs: list[dict], names: str) -> list[dict]:
    """The runs named in `names` (';'-separated `name`s), in that order."""
    by_name = {name(r): r for r in runs}
    wanted = [n.strip() for n in names.split(";") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"no run named {unknown}; the runs are: " + "; ".join(by_name))
    return [by_name[n] for n in wanted]


def stale_heads(stored: dict, head_rewards: dict[str, str]) -> dict[str, str]:
    """The heads (-> reward) a stored run's rewards lack or scored with another reward than
    `head_rewards` names: a run records `head_rewards`; one from before that used the legacy ones."""
    had = stored.get("head_rewards", LEGACY_HEAD_REWARDS)
    scored = stored["reward"] if "reward" in stored else stored["rewards"]
    return {h: r for h, r in head_rewards.items() if h not in scored or had.get(h) != r}


def with_rewards(run: dict, head_rewards: dict[str, str]) -> dict:
    """A server run with the mean reward (and s.e.) of every head: the heads it lacks or stored
    under another reward (before `specific` replaced `civil`, before `concise` counted tokens) are
    scored from its answers' texts."""
    missing = stale_heads(run, head_rewards)
    if not missing or not run.get("samples"):
        return run
    import statistics

    from prefix_scorers.rewards import score_texts

    texts = [a["text"] for a in run["samples"]]
    scored = score_texts(texts, list(missing.values()))
    return {**run, "head_rewards": {**run.get("head_rewards", {}), **head_rewards},
            "reward": {**run["reward"], **{h: statistics.fmean(scored[r]) for h, r in missing.items()}},
            "reward_sem": {**run["reward_sem"], **{h: statistics.stdev(scored[r]) / len(texts) ** 0.5
                                                   for h, r in missing.items()}}}


def scorer_id(path: str | Path) -> str:
    """A scorer checkpoint's identity: the first 12 hex digits of the sha256 of its weights and of
    its config.json less provenance (the normaliser's statistics steer too: a renormalised export
    of the same weights is another scorer); the same checkpoint under another path has the same id."""
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: pass a scorer folder (config.json + model.safetensors)")
    h = hashlib.sha256()
    with weights.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    config = Path(path) / "config.json"
    if config.is_file():
        steering = {k: v for k, v in json.loads(config.read_text()).items() if k != "provenance"}
        h.update(json.dumps(steering, sort_keys=True).encode())
    return h.hexdigest()[:12]


def sweep_points(results: list[dict]) -> list[dict]:
    """The weights sweep's runs, positive's weight falling, with (1, 0): the token run steering
    positive alone at the sweep's top_k, tail and strength (not the tail-kept run of the same k)."""
    sweep = [r for r in results if r.get("sweep")]
    if not sweep:
        return []
    alone = [r for r in results if r["mode"] == "token" and r["weights"] == {"positive": 1.0}
             and r["top_k"] == sweep[0]["top_k"] and r["strength"] == sweep[0]["strength"]
             and r.get("tail", "drop") == sweep[0].get("tail", "drop")]
    return sorted([{**r, "weights": {"positive": 1.0, "concise": 0.0}} for r in alone] + sweep,
                  key=lambda r: -r["weights"]["positive"])
