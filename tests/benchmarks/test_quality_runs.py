"""The quality benchmark's run cache: which runs depend on the scorer, when a cached run is
reused, runs picked by name, and a scorer's identity (no model, no server)."""

from __future__ import annotations

import json

import pytest

from benchmarks.quality.runs import (
    name,
    named,
    reusable,
    scorer_id,
    sweep_points,
    uses_scorer,
    with_rewards,
)

TOKEN = {"mode": "token", "weights": {"positive": 1.0}, "strength": 1.0, "top_k": 20}
PLAIN = {"mode": "none", "weights": {"positive": 1.0}}
SAMPLES = {**PLAIN, "samples_per_prompt": 16}
REWARD = {"mode": "best_of_n", "weights": {}, "rewards": {"vader_compound": 1.0}, "num_candidates": 4}


def test_runs_steered_or_ranked_by_the_scorer_depend_on_it():
    assert uses_scorer(TOKEN)
    assert uses_scorer(SAMPLES)  # they store the scorer's value of every sample
    assert not uses_scorer(PLAIN)
    assert not uses_scorer(REWARD)


def test_a_scorer_dependent_run_is_reused_only_with_the_same_scorer():
    done = lambda run, **kw: {**run, "n": 48, **kw}
    assert reusable(done(TOKEN, scorer_id="aaa"), TOKEN, 48, "aaa")
    assert not reusable(done(TOKEN, scorer_id="bbb"), TOKEN, 48, "aaa")
    assert not reusable(done(TOKEN), TOKEN, 48, "aaa")  # stored before runs named their scorer
    assert not reusable(done(TOKEN, scorer_id="aaa"), TOKEN, 16, "aaa")  # other prompts
    assert not reusable(None, TOKEN, 48, "aaa")
    assert reusable(done(PLAIN), PLAIN, 48, "aaa")  # plain decoding is the same under any scorer
    assert reusable(done(REWARD, scorer_id="bbb"), REWARD, 48, "aaa")


def test_runs_are_picked_by_their_report_names_in_the_order_given():
    other = {**TOKEN, "weights": {"specific": 1.0}, "strength": 4.0}
    runs = [PLAIN, TOKEN, other, REWARD]
    assert name(other) == "token s=4 top_k=20 [specific=1]"
    assert named(runs, "token s=4 top_k=20 [specific=1]; none") == [other, PLAIN]
    with pytest.raises(ValueError, match="no run named.*token s=3"):
        named(runs, "token s=3 top_k=20")


def test_a_scorer_is_identified_by_its_weights_and_normaliser(tmp_path):
    a, b, c, d, e = (tmp_path / x for x in "abcde")
    config = lambda std, note: json.dumps({"normalization": {"mean": [[0.0]], "std": [[std]]},
                                           "provenance": {"note": note}})
    for folder, weights, cfg in ((a, b"one", config(1.0, "x")), (b, b"one", config(1.0, "y")),
                                 (c, b"two", config(1.0, "x")), (d, b"one", config(2.0, "x")), (e, b"one", None)):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(weights)
        if cfg:
            (folder / "config.json").write_text(cfg)
    assert scorer_id(a) == scorer_id(b)  # provenance does not steer
    assert len({scorer_id(a), scorer_id(c), scorer_id(d), scorer_id(e)}) == 4  # a renormalised export does
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        scorer_id(tmp_path)


def test_a_run_stored_under_other_heads_gets_the_missing_rewards_from_its_texts():
    from prefix_scorers.rewards import get_reward

    texts = ["Bake at 180 degrees for 25 minutes.", "It is a good thing."]
    run = {**PLAIN, "reward": {"positive": 0.5}, "reward_sem": {"positive": 0.1},
           "samples": [{"prompt": "p", "text": t} for t in texts]}
    full = with_rewards(run, {"positive": "vader_compound", "specific": "specificity"})
    spec = get_reward("specificity")
    assert full["reward"]["specific"] == pytest.approx(sum(spec(texts)) / 2)
    assert full["reward"]["positive"] == 0.5  # kept as stored
    assert with_rewards(full, {"positive": "vader_compound", "specific": "specificity"}) is full


def test_a_run_stored_with_another_reward_behind_a_head_is_rescored():
    """`concise` counted words up to 44ed424 and counts tokens since: a stored run's word-based
    `concise` must not pass for the new reward (runs stored before `head_rewards` are legacy)."""
    from prefix_scorers.rewards import get_reward

    texts = ["A-B-A-B-A-B-A-B-A-B-A-B-A-B-A-B-A-B-A-B", "It is a good thing."]
    words = get_reward("concise")(texts)
    run = {**PLAIN, "reward": {"positive": 0.5, "concise": sum(words) / 2},
           "reward_sem": {"positive": 0.1, "concise": 0.1}, "samples": [{"prompt": "p", "text": t} for t in texts]}
    heads = {"positive": "vader_compound", "concise": "concise_tokens"}
    new = with_rewards(run, heads)
    assert new["reward"]["concise"] == pytest.approx(sum(get_reward("concise_tokens")(texts)) / 2)
    assert new["reward"]["concise"] != pytest.approx(run["reward"]["concise"])
    assert new["head_rewards"] == heads and with_rewards(new, heads) is new
    legacy = {"positive": "vader_compound", "concise": "concise"}
    assert with_rewards(run, legacy) is run  # the reward it was stored with: kept


def test_sweep_points_take_one_run_per_weight_not_the_tail_kept_one():
    def token(w, tail=None, **extra):
        run = {"mode": "token", "weights": w, "top_k": 100, "strength": 2.0, **({"tail": tail} if tail else {})}
        return {**run, **extra}

    results = [{"mode": "none", "weights": {"positive": 1.0}},
               token({"positive": 1.0}, reward=1), token({"positive": 1.0}, tail="keep", reward=2),
               token({"positive": 1.0}, strength=4.0), token({"positive": 1.0}, top_k=20),
               token({"positive": 0.5, "concise": 0.5}, sweep=True), token({"positive": 0.0, "concise": 1.0}, sweep=True)]
    points = sweep_points(results)
    assert [p["weights"]["positive"] for p in points] == [1.0, 0.5, 0.0]
    assert points[0]["reward"] == 1  # the dropped-tail run of the same top_k and strength
    assert sweep_points(results[:5]) == []  # no sweep runs: nothing to draw


def test_a_run_with_plausibility_is_its_own_run_and_family():
    from benchmarks.quality import report
    from benchmarks.quality.runs import token_words

    held = {**TOKEN, "weights": {"specific": 1.0}, "strength": 4.0, "plausibility": 0.05}
    assert name(held) == "token s=4 top_k=20 plausibility=0.05 [specific=1]"
    assert token_words(held) == "top 20, plausibility 0.05"
    assert report.family(held) != report.family({**held, "plausibility": 0.0}) == report.family(TOKEN)
    assert named([TOKEN, held], name(held)) == [held]
