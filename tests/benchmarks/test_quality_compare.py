"""benchmarks.quality.compare: the same runs of two quality caches, paired by prompt (no model, no server)."""

from __future__ import annotations

import pytest

from benchmarks.quality.compare import compare

GOOD, BAD, FLAT = "What a wonderful, happy day!", "This is terrible and awful.", "The table has four legs."


def token_run(texts: list[str], strength: float = 1.0, prompts: list[str] | None = None) -> dict:
    prompts = prompts or [f"p{i}" for i in range(len(texts))]
    return {"mode": "token", "weights": {"positive": 1.0}, "strength": strength, "top_k": 100,
            "samples": [{"prompt": p, "text": t} for p, t in zip(prompts, texts)]}


def test_paired_difference_of_the_same_runs():
    old = {"runs": [token_run([FLAT, BAD, FLAT, BAD]), token_run([FLAT] * 4, strength=4.0)]}
    new = {"runs": [token_run([GOOD, GOOD, FLAT, GOOD]), token_run([FLAT] * 4, strength=4.0)]}
    rows = {r["run"]: r for r in compare(old, new)}
    moved, same = rows["token s=1 top_k=100"], rows["token s=4 top_k=100"]
    assert moved["new"] > moved["old"]
    assert moved["same_answers"] == 1
    lo, hi = moved["diff_95"]
    assert 0 < lo <= moved["new"] - moved["old"] <= hi  # every prompt moved up or stayed: above 0
    assert same["diff_95"] == (0.0, 0.0) and same["same_answers"] == 4
    assert same["new"] == pytest.approx(same["old"])


def test_runs_one_cache_lacks_or_over_other_prompts_are_skipped():
    old = {"runs": [token_run([FLAT, BAD]), token_run([FLAT, BAD], strength=2.0, prompts=["a", "b"])]}
    new = {"runs": [token_run([GOOD, GOOD]), token_run([GOOD, GOOD], strength=2.0),
                    token_run([GOOD, GOOD], strength=4.0)]}
    assert [r["run"] for r in compare(old, new)] == ["token s=1 top_k=100"]


def test_another_head_is_scored_with_its_own_reward():
    """`--head specific` pairs the runs on `specific`'s reward, not on the first head's."""
    from benchmarks.quality.compare import REWARDS
    from prefix_scorers.rewards import get_reward

    vague, specific = "It was a very nice and good day.", "We hiked 12 miles past glaciers, moraines and fjords."
    old, new = {"runs": [token_run([vague] * 3)]}, {"runs": [token_run([specific] * 3)]}
    by_positive, by_specific = compare(old, new)[0], compare(old, new, "specific")[0]
    reward = get_reward(REWARDS["specific"])
    assert by_specific["new"] == pytest.approx(reward([specific])[0]) and by_specific["new"] > by_specific["old"]
    assert by_positive["new"] < by_positive["old"]  # the same answers lose on sentiment
