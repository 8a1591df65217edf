"""The quality report's client-side best-of-N, its server-run checks and its text measures, on
hand-made samples (no model, no server)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.quality import judges
from benchmarks.quality.report import build, client_rows, server_row, targets, with_head_rewards
from prefix_scorers.rewards import get_reward

HEAD_REWARDS = {"positive": "vader_compound", "specific": "specificity", "concise": "concise", "readable": "readable"}


def samples_run(per_prompt_rewards: list[list[float]], tokens: int = 10) -> dict:
    """A plain-samples run: sample j of prompt i has positive reward per_prompt_rewards[i][j] and
    a scorer value that ranks the samples in reverse."""
    per = []
    for i, rs in enumerate(per_prompt_rewards):
        per.append({
            "prompt": f"p{i}", "texts": [f"answer {i}.{j}" for j in range(len(rs))],
            "finish_reasons": ["stop"] * len(rs),
            "controls": [{"combined": -r, "tokens_generated": tokens + 1} for r in rs],
            "rewards": {h: (list(rs) if h == "positive" else [0.5] * len(rs)) for h in HEAD_REWARDS}})
    return {"mode": "none", "weights": {"positive": 1.0}, "samples_per_prompt": len(per_prompt_rewards[0]),
            "per_prompt": per, "seconds": 16.0}


def test_true_reward_best_of_n_keeps_the_best_of_the_first_n_samples():
    s = samples_run([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.0]])
    rows = {r["label"]: r for r in client_rows(s, [2, 4])}
    tr2, tr4 = rows["true-reward best-of-2 (client)"], rows["true-reward best-of-4 (client)"]
    assert [a["text"] for a in tr2["answers"]] == ["answer 0.1", "answer 1.0"]
    assert tr2["reward"]["positive"] == pytest.approx((0.9 + 0.3) / 2)
    assert tr4["reward"]["positive"] == pytest.approx((0.9 + 0.8) / 2)
    # the scorer ranks in reverse here: its best-of-2 keeps the worse sample
    sc2 = rows["scorer-ranked best-of-2 (client, recomputed)"]
    assert sc2["reward"]["positive"] == pytest.approx((0.1 + 0.2) / 2)
    # 4 samples of 11 sampled tokens (EOS included) per 10-token answer
    assert tr4["gen_per_answer"] == pytest.approx(4 * 11 / 10)
    assert tr4["seconds"] == pytest.approx(16.0)
    # distinct rewards: the measured KL is the bound
    assert tr4["kl_measured"] == pytest.approx(math.log(4) - 3 / 4)
    assert tr4["kl_reported"] == pytest.approx(math.log(4) - 3 / 4)


def test_tied_rewards_lower_the_measured_kl():
    s = samples_run([[0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.2, 0.2]])
    tr4 = next(r for r in client_rows(s, [4]) if r["rank_by"] == "reward")
    assert tr4["kl_measured"] < math.log(4) - 3 / 4


def server_run(s: dict, texts: list[str], **control) -> dict:
    return {**control, "kl": 0.64, "tokens_per_accepted": 4.0, "seconds": 10.0,
            "samples": [{"prompt": p["prompt"], "text": t} for p, t in zip(s["per_prompt"], texts)]}


def test_a_server_best_of_n_is_checked_against_the_samples():
    s = samples_run([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.0]])
    right = server_row(server_run(s, ["answer 0.1", "answer 1.2"], mode="best_of_n", weights={},
                                  rewards={"vader_compound": 1.0}, num_candidates=4), s, HEAD_REWARDS)
    assert right["same_as_client_best_of_n"] == 1.0
    assert right["kl_measured"] == pytest.approx(math.log(4) - 3 / 4)
    wrong = server_row(server_run(s, ["answer 0.0", "answer 1.2"], mode="best_of_n", weights={},
                                  rewards={"vader_compound": 1.0}, num_candidates=4), s, HEAD_REWARDS)
    assert wrong["same_as_client_best_of_n"] == 0.5


def test_pruned_best_of_n_gets_the_rank_mixture_kl():
    s = samples_run([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.0]])
    # kept the second best of 4 for one prompt, the best for the other
    r = server_row(server_run(s, ["answer 0.3", "answer 1.2"], mode="best_of_n", weights={},
                              rewards={"vader_compound": 1.0}, num_candidates=4, prune_every=8,
                              keep_fraction=0.5), s, HEAD_REWARDS)
    assert r["winner_rank_mean"] == pytest.approx(3.5)
    assert 0 < r["kl_measured"] < math.log(4) - 3 / 4
    assert r["kl_upper"] == pytest.approx(math.log(4))


def test_a_reward_in_the_loop_mismatch_is_reported_as_not_met():
    s = samples_run([[0.1, 0.9], [0.3, 0.2]])
    none = server_row(server_run(s, ["answer 0.0", "answer 1.0"], mode="none", weights={"positive": 1.0}),
                      s, HEAD_REWARDS)
    none["label"] = "none"
    bad = server_row(server_run(s, ["answer 0.0", "answer 1.0"], mode="best_of_n", weights={},
                                rewards={"vader_compound": 1.0}, num_candidates=2), s, HEAD_REWARDS)
    rows = [none, bad] + client_rows(s, [2])
    [check] = [t for t in targets(rows, []) if "equals client-side" in t["target"]]
    assert check["met"] is False


def test_text_measures():
    assert judges.repetition("the cat sat the cat sat") == pytest.approx(1 / 4)
    assert judges.repetition("one two") == 0.0
    assert judges.distinct_2(["a b c", "a b d"]) == pytest.approx(3 / 4)
    assert judges.nonword_share(["hello world", "zxqvbnm fine"]) == pytest.approx(1 / 4)
    good, bad = judges.afinn_scores(["What a wonderful, happy day!", "This is terrible and awful."])
    assert good > 0 > bad


def test_no_measured_kl_from_samples_ranked_by_another_score():
    """The samples carry the positive scorer value: a best_of_n steering concise cannot use them."""
    s = samples_run([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.0]])
    r = server_row(server_run(s, ["answer 0.1", "answer 1.2"], mode="best_of_n", weights={"concise": 1.0},
                              num_candidates=4), s, HEAD_REWARDS)
    assert r["kl_measured"] is None
    assert r["label"].endswith("[concise=1]")


def test_pruned_winners_off_the_sample_seeds_get_the_fitted_best_of_a_kl():
    """Winners that are none of the samples (the engine drew other tokens): ranked among the
    samples by their own reward, with the best-of-a law fitted to the ranks."""
    s = samples_run([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.0]])
    r = server_row(server_run(s, ["A wonderful, happy, lovely day!", "Great, joyful, excellent work!"],
                              mode="best_of_n", weights={}, rewards={"vader_compound": 1.0}, num_candidates=4,
                              prune_every=8, keep_fraction=0.5), s, HEAD_REWARDS)
    assert r["winners_among_samples"] == 0.0
    assert r["effective_n"] > 4  # both beat every sample
    assert r["kl_measured"] == pytest.approx(math.log(r["effective_n"]) - (r["effective_n"] - 1) / r["effective_n"])


def test_block_rows_take_the_measured_block_kl_when_it_was_run():
    answers = [{"prompt": f"p{i}", "text": f"a happy answer {i}"} for i in range(3)]
    run = {"mode": "block", "weights": {"positive": 1.0}, "block_size": 8, "num_candidates": 4, "samples": answers,
           "kl": 3.6, "tokens_per_accepted": 4.0, "seconds": 1.0}
    measured = {"block K=4 M=8": {"kl_measured": 2.5, "kl_measured_sem": 0.1, "kl_bound": 3.8, "kl_reported": 3.6,
                                  "answers": 2,
                                  "samples_per_block": 16, "per_answer": [{"prompt": "p0"}, {"prompt": "p1"}]}}
    r = server_row(run, None, HEAD_REWARDS, measured)  # measured on the first 2 of the 3 answers
    assert (r["kl_reported"], r["kl_measured"], r["kl_measured_sem"]) == (3.6, 2.5, 0.1)
    assert server_row(run, None, HEAD_REWARDS, {})["kl_measured"] is None  # not run: the bound only
    stale = {"block K=4 M=8": {**measured["block K=4 M=8"], "per_answer": [{"prompt": "p1"}, {"prompt": "p0"}]}}
    assert server_row(run, None, HEAD_REWARDS, stale)["kl_measured"] is None  # measured on other answers
    # the same prompts, but another run of that setting (another scorer's): its reported KL differs
    rerun = {**run, "kl": 4.1}
    assert server_row(rerun, None, HEAD_REWARDS, measured)["kl_measured"] is None


def test_a_samples_run_stored_without_a_head_gets_its_rewards_scored_from_the_texts():
    # runs stored under the old default heads (`civil`) have no `specific` rewards per sample
    s = samples_run([[0.1, 0.9], [0.3, 0.2]])
    texts = [["It is good and nice, 2023 2023 2023.", "Bake at 180 degrees for 25 minutes with cardamom."],
             ["Chlorophyll absorbs photons in chloroplasts.", "You can do it, it is a good thing."]]
    for p, t in zip(s["per_prompt"], texts):
        p["texts"] = t
        p["rewards"].pop("specific", None)
    heads = {"positive": "vader_compound", "specific": "specificity"}
    filled = with_head_rewards(s, heads)
    spec = get_reward("specificity")
    assert [p["rewards"]["specific"] for p in filled["per_prompt"]] == [spec(t) for t in texts]
    assert [p["rewards"]["positive"] for p in filled["per_prompt"]] == [[0.1, 0.9], [0.3, 0.2]]  # kept as stored
    assert with_head_rewards(filled, heads) is filled  # nothing missing: nothing rescored
    tr2 = next(r for r in client_rows(filled, [2], heads=tuple(heads)) if r["rank_by"] == "reward")
    assert tr2["reward"]["specific"] == pytest.approx((spec(texts[0])[1] + spec(texts[1])[0]) / 2)
    # a head now behind another reward (legacy samples: `specific` was `specificity`) is rescored
    distinct = {**heads, "specific": "specificity_distinct"}
    again = with_head_rewards(filled, distinct)
    spec2 = get_reward("specificity_distinct")
    assert [p["rewards"]["specific"] for p in again["per_prompt"]] == [spec2(t) for t in texts]
    assert again["per_prompt"][0]["rewards"]["specific"][0] < filled["per_prompt"][0]["rewards"]["specific"][0]
    assert with_head_rewards(again, distinct) is again


def test_a_report_keeps_the_runs_of_the_caches_scorer_and_lists_the_others(tmp_path):
    """A cache holding runs of two scorers: the scorer-dependent runs of the other one are left out
    (named), plain and reward-ranked runs stay, and samples carrying the other scorer's values
    rank by the reward only."""
    s = samples_run([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.0]])
    s.update(mode="none", n=2, scorer_id="old")
    words = ["good", "bad", "great", "awful"]  # texts the judge (AFINN) tells apart
    for i, p in enumerate(s["per_prompt"]):
        p["texts"] = [f"A {words[(i + j) % 4]} answer {i}.{j}." for j in range(4)]
    answers = lambda j: [{"prompt": p["prompt"], "text": p["texts"][j]} for p in s["per_prompt"]]
    common = {"n": 2, "seconds": 1.0, "tokens_per_accepted": 1.0, "completion_tokens": 10.0}
    runs = [s,
            {"mode": "none", "weights": {"positive": 1.0}, "kl": 0.0, "samples": answers(0), **common},
            {"mode": "token", "weights": {"positive": 1.0}, "strength": 1.0, "top_k": 20, "kl": 2.0,
             "samples": answers(1), "scorer_id": "new", **common},
            {"mode": "token", "weights": {"positive": 1.0}, "strength": 4.0, "top_k": 20, "kl": 9.0,
             "samples": answers(2), "scorer_id": "old", **common},
            {"mode": "best_of_n", "weights": {}, "rewards": {"vader_compound": 1.0}, "num_candidates": 4,
             "kl": 0.64, "samples": answers(1), **common}]
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"meta": {"scorer": "S", "scorer_id": "new"}, "runs": runs}))
    rep = build(path, None)
    labels = {r["label"] for r in rep["rows"]}
    assert {"none", "token s=1 top_k=20", "best_of_n N=4 reward-ranked", "true-reward best-of-4 (client)"} <= labels
    assert "token s=4 top_k=20" not in labels
    assert not any(lab.startswith("scorer-ranked") for lab in labels)
    assert rep["left_out_other_scorer"] == ["token s=4 top_k=20 (scorer old)"]
    s["scorer_id"] = "new"  # the samples' values are the cache's scorer's: they rank too
    path.write_text(json.dumps({"meta": {"scorer": "S", "scorer_id": "new"}, "runs": runs}))
    assert "scorer-ranked best-of-4 (client, recomputed)" in {r["label"] for r in build(path, None)["rows"]}


def test_the_ranker_target_falls_back_to_the_client_side_best_of_8_without_a_server_run():
    s = samples_run([[0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.4, 0.6], [0.3, 0.2, 0.8, 0.0, 0.1, 0.4, 0.5, 0.6]])
    none = server_row(server_run(s, ["answer 0.0", "answer 1.0"], mode="none", weights={"positive": 1.0}),
                      s, HEAD_REWARDS)
    none["label"] = "none"
    [ranker] = [t for t in targets([none] + client_rows(s, [8]), []) if "best-of-8's gain" in t["target"]]
    # the scorer ranks in reverse: it keeps the worst of 8 (0.1 and 0.0), below plain decoding (0.1, 0.3)
    assert ranker["met"] is False
    assert "client-side" in ranker["detail"]


def test_block_kl_is_keyed_by_the_scorer_of_the_run_it_measured():
    """The cache holds `block K=4 M=8` of several scorers: each one's measured KL is its own."""
    from benchmarks.quality.runs import scorer_label

    answers = [{"prompt": f"p{i}", "text": f"a happy answer {i}"} for i in range(2)]
    base = {"mode": "block", "weights": {"positive": 1.0}, "block_size": 8, "num_candidates": 4, "samples": answers,
            "kl": 3.6, "tokens_per_accepted": 4.0, "seconds": 1.0}
    a, b = {**base, "scorer_id": "aaaa"}, {**base, "scorer_id": "bbbb"}
    assert scorer_label(a) == "block K=4 M=8 @aaaa" != scorer_label(b)
    assert scorer_label({**base, "weights": {}, "rewards": {"positive": 1.0}}) == "block K=4 M=8 reward-ranked"  # no scorer
    entry = {"kl_measured": 2.5, "kl_measured_sem": 0.1, "kl_bound": 3.8, "kl_reported": 3.6, "answers": 2,
             "samples_per_block": 16, "per_answer": [{"prompt": "p0"}, {"prompt": "p1"}]}
    measured = {scorer_label(a): entry}
    assert server_row(a, None, HEAD_REWARDS, measured)["kl_measured"] == 2.5
    assert server_row(b, None, HEAD_REWARDS, measured)["kl_measured"] is None  # same setting, other scorer


def test_the_monotonic_target_reads_the_token_runs_at_the_servers_default_top_k(monkeypatch):
    """Top-20 runs fall at weight 0.5 while whole-vocabulary runs rise: the target follows
    whichever top_k the server uses by default, and names it."""
    from benchmarks.quality import report

    def row(label, reward, **run):
        return {"label": label, "family": report.family(run), "run": run, "kl_measured": 0.0,
                "gen_per_answer": 1.0, "reward": {"positive": reward}, "reward_sem": {"positive": 0.001}}

    rows = [row("none", 0.47, mode="none", weights={"positive": 1.0})]
    for top_k, rewards in ((20, (0.46, 0.61)), (0, (0.49, 0.59))):
        rows += [row(f"token s={s:g} top_k={top_k}", r, mode="token", weights={"positive": 1.0}, strength=s,
                     top_k=top_k) for s, r in zip((0.5, 1.0), rewards)]
    for default, met in ((0, True), (20, False)):
        monkeypatch.setattr(report, "DEFAULT_TOP_K", default)
        [t] = [t for t in report.targets(rows, []) if t["target"].startswith("positive reward rises")]
        assert t["met"] is met
        assert ("all tokens" if default == 0 else "top 20") in t["target"]


def test_the_rankers_share_of_the_gain_gets_a_bootstrap_interval_over_prompts():
    from benchmarks.quality.report import gain_share_interval

    def r(values):
        return {"answers": [{"prompt": f"p{i}"} for i in range(len(values))], "positive_per_answer": values}

    none, best = r([0.0, 0.2, 0.4, 0.1]), r([1.0, 1.2, 1.4, 1.1])
    assert gain_share_interval(none, best, r([0.5, 0.7, 0.9, 0.6])) == pytest.approx((0.5, 0.5))  # half on every prompt
    lo, hi = gain_share_interval(none, best, r([1.0, 0.2, 0.9, 0.6]))  # 1, 0, 0.5, 0.5: mean 0.5
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    # prompts are matched by name, not position
    shuffled = {"answers": [{"prompt": p} for p in ("p3", "p2", "p1", "p0")], "positive_per_answer": [0.6, 0.9, 0.7, 0.5]}
    assert gain_share_interval(none, best, shuffled) == pytest.approx((0.5, 0.5))


def test_a_paired_difference_gets_a_bootstrap_interval_over_the_prompts_two_runs_share():
    from benchmarks.quality.report import paired_interval

    def r(prompts, values):
        return {"answers": [{"prompt": p} for p in prompts], "positive_per_answer": values}

    base = r(["p0", "p1", "p2", "p3"], [0.1, 0.5, 0.2, 0.9])
    assert paired_interval(r(["p3", "p2", "p1", "p0"], [1.0, 0.3, 0.6, 0.2]), base) == pytest.approx((0.1, 0.1))
    lo, hi = paired_interval(r(["p0", "p1", "p2", "p3", "extra"], [0.3, 0.3, 0.4, 0.9, 5.0]), base)  # +.2 -.2 +.2 0
    assert -0.2 <= lo < 0.05 < hi <= 0.2  # the prompt only one run has is left out


def test_the_128_token_concise_check_reads_the_token_count_of_its_own_run(monkeypatch):
    """The cache holds the 128-token concise run of an earlier default top_k (stored first) and of
    today's: the check compares today's run's answer tokens with the plain run's."""
    from benchmarks.quality import report

    monkeypatch.setattr(report, "DEFAULT_TOP_K", 100)
    plain = {"mode": "none", "weights": {"concise": 1.0}, "max_tokens": 128, "completion_tokens": 100.0}
    old = {"mode": "token", "weights": {"concise": 1.0}, "top_k": 20, "max_tokens": 128, "completion_tokens": 90.0}
    new = {**old, "top_k": 100, "completion_tokens": 30.0}

    def row(label, run, reward=0.5):
        return {"label": label, "family": report.family(run), "run": report.run_settings(run), "words": 10.0,
                "kl_measured": 0.0, "gen_per_answer": 1.0, "reward": {"positive": reward},
                "reward_sem": {"positive": 0.01}}

    rows = [row("none", {"mode": "none", "weights": {"positive": 1.0}}),
            row("none max_tokens=128", plain), row("token default strength top_k=20 max_tokens=128 [concise=1]", old),
            row("token default strength top_k=100 max_tokens=128 [concise=1]", new)]
    [t] = [t for t in report.targets(rows, [plain, old, new]) if t["target"].startswith("concise at the server")]
    assert t["met"] is True and t["detail"].startswith("30.0 vs 100.0 answer tokens (0.30x)")


def test_block_runs_ranked_by_the_reward_and_the_scorer_are_their_own_family_and_plotted():
    from benchmarks.quality.report import STYLE, family

    reward_only = {"mode": "block", "weights": {}, "rewards": {"vader_compound": 1.0}, "segment": "entropy"}
    both = {**reward_only, "weights": {"positive": 0.4}}
    assert family(reward_only) == "block, reward in the loop (entropy)"
    assert family(both) == "block, reward + scorer (entropy)"  # not one line through both
    assert family({**both, "segment": "fixed"}) in STYLE and family(both) in STYLE


def test_a_run_past_the_measured_best_of_n_curve_is_not_counted_as_reaching_it():
    """The true-reward curve ends at best-of-4 (KL 0.64): a token run at KL 5 above best-of-4's
    reward is undecided (best-of-N at KL 5 is unknown and higher), one below it is below the curve;
    a run inside the curve and above it reaches it."""
    from benchmarks.quality import report

    s = samples_run([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.0]])  # best-of-4 0.85 at KL 0.64
    none = {"label": "none", "family": "none", "run": {"mode": "none", "weights": {"positive": 1.0}},
            "kl_measured": 0.0, "gen_per_answer": 1.0, "reward": {"positive": 0.2}, "reward_sem": {"positive": 0.01},
            "answers": [{"prompt": "p0"}, {"prompt": "p1"}], "positive_per_answer": [0.2, 0.2]}

    def token(reward, kl, gen=1.0):
        run = {"mode": "token", "weights": {"positive": 1.0}, "strength": 4.0, "top_k": 100}
        return {"label": f"token kl={kl}", "family": report.family(run), "run": run, "kl_measured": kl,
                "kl_reported": kl, "gen_per_answer": gen, "reward": {"positive": reward},
                "reward_sem": {"positive": 0.01}, "answers": [{"prompt": "p0"}, {"prompt": "p1"}],
                "positive_per_answer": [reward, reward]}

    def kl_target(*runs):
        [t] = [t for t in targets([none, *runs] + client_rows(s, [2, 4]), []) if "equal measured KL" in t["target"]]
        return t

    past_above = kl_target(token(0.95, 5.0))
    assert past_above["met"] is False
    assert "+0.100 vs its last point (past the curve: undecided)" in past_above["detail"]
    assert "-0.050 or less (past the curve)" in kl_target(token(0.80, 5.0))["detail"]
    assert kl_target(token(0.95, 5.0), token(0.90, 0.5))["met"] is True  # inside the curve and above it
    [cost] = [t for t in targets([none, token(0.95, 9.0, gen=9.0)] + client_rows(s, [2, 4]), [])
              if "equal base tokens" in t["target"]]
    assert cost["met"] is False and "past the curve: undecided" in cost["detail"]


def test_fluency_is_also_judged_at_the_servers_default_strength_alone():
    """A strength-4 run full of non-words fails the fluency target; the default-control row reads
    only the runs at the server's default strength and top_k, one head each, without plausibility."""
    from benchmarks.quality import report
    from benchmarks.quality.runs import DEFAULT_STRENGTH, DEFAULT_TOP_K

    def judged(label, run, nonwords):
        return {"label": label, "family": report.family(run), "run": run, "kl_measured": 0.0, "gen_per_answer": 1.0,
                "reward": dict.fromkeys(HEAD_REWARDS, 0.5), "reward_sem": dict.fromkeys(HEAD_REWARDS, 0.01), "nonword_share": 0.0,
                "repetition": 0.0, "distinct_2": 0.9, "nonword_per_answer": nonwords, "repetition_per_answer": [0.0] * 8}

    token = {"mode": "token", "weights": {"specific": 1.0}, "top_k": DEFAULT_TOP_K}
    rows = [judged("none", {"mode": "none", "weights": {"positive": 1.0}}, [0.0] * 8),
            judged("strong", {**token, "strength": 4.0}, [0.5] * 8),
            judged("default", {**token, "strength": DEFAULT_STRENGTH}, [0.0] * 7 + [0.01]),
            judged("held", {**token, "strength": DEFAULT_STRENGTH, "plausibility": 0.05}, [0.5] * 8)]
    got = {t["target"].split(" (")[0] if "within noise" in t["target"] else t["target"]: t
           for t in report.targets(rows, []) if "fluency" in t["target"]}
    overall, default = got["fluency no worse than plain decoding within noise"], got.pop(
        next(k for k in got if "default token control" in k))
    assert overall["met"] is False and "strong" in overall["detail"] and "held" in overall["detail"]
    assert default["met"] is True and default["detail"].startswith("1 heads (specific)")


def test_a_run_is_compared_with_the_mixture_of_the_two_best_of_n_rows_around_its_kl():
    from benchmarks.quality.report import curve_interval

    def r(values):
        return {"answers": [{"prompt": f"p{i}"} for i in range(len(values))], "positive_per_answer": values}

    lo, hi = r([0.0, 0.2, 0.4, 0.1]), r([1.0, 1.2, 1.4, 1.1])
    curve = [(0.0, r([0.0] * 4)), (0.2, lo), (0.6, hi)]
    # at KL 0.4, halfway from 0.2 to 0.6: the curve is lo + 0.5 on every prompt
    assert curve_interval(r([0.5, 0.7, 0.9, 0.6]), curve, 0.4) == pytest.approx((0.0, 0.0))
    low, high = curve_interval(r([0.5, 0.7, 1.9, 0.6]), curve, 0.4)  # one prompt 1 above: mean +0.25
    assert -1e-9 <= low < 0.25 < high <= 1.0
    assert curve_interval(r([0.5] * 4), curve, 0.9) is None  # past the curve: no mixture reaches it
