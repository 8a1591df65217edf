"""Segment rewards from a built-in reward, the location-aware normaliser and the dense target,
each against numbers computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prefix_scorers.base_model import load_tokenizer
from prefix_scorers.config import HeadSpec
from prefix_scorers.dense_targets import dense_targets
from prefix_scorers.location_norm import LocationNormalizer, load_normalizers
from prefix_scorers.prompts import write_jsonl
from prefix_scorers.segment_labels import (
    SegmentConfig,
    load_segment_labels,
    segment_rollouts,
    source_labels,
)


def test_location_normalizer_by_hand():
    # token location, buckets of 4 tokens, 3 buckets; min_count 2
    labels = [(0, 0, 1.0), (0, 0, 3.0), (1, 2, 5.0),  # bucket 0: 1, 3, 5 -> mean 3, std sqrt(8/3)
              (1, 5, 2.0), (2, 7, 2.0),  # bucket 1: 2, 2 -> mean 2, std 0 -> floored
              (3, 9, 10.0),  # bucket 2: one label < min_count -> copies bucket 1
              (4, 40, None)]  # missing: not fitted
    norm = LocationNormalizer(location="token", bucket=4, num_buckets=3, min_count=2, std_floor=0.1).fit(labels)
    # pooled over the six labels: mean 23/6, E[x^2] = 143/6 -> std = sqrt(143/6 - (23/6)^2)
    pooled_std = (143 / 6 - (23 / 6) ** 2) ** 0.5
    assert norm.count == [3, 2, 1]
    assert norm.mean == pytest.approx([3.0, 2.0, 2.0])
    assert norm.std == pytest.approx([(8 / 3) ** 0.5, 0.1 * pooled_std, 0.1 * pooled_std])
    assert norm.normalize(0, 1, 5.0) == pytest.approx(2 / (8 / 3) ** 0.5)
    assert norm.normalize(7, 100, 2.0 + 0.1 * pooled_std) == pytest.approx(1.0)  # far locations: last bucket
    assert norm.normalize(0, 0, None) is None
    by_index = LocationNormalizer(location="index", bucket=1, num_buckets=2, min_count=1).fit(labels)
    assert by_index.mean == pytest.approx([2.0, 19 / 4])  # index 0: 1, 3; index >= 1: 5, 2, 2, 10
    assert by_index.count == [2, 4]


def test_location_normalizer_refuses_bad_settings_and_empty_data():
    with pytest.raises(ValueError, match="location must be"):
        LocationNormalizer(location="word")
    with pytest.raises(ValueError, match="no labels"):
        LocationNormalizer().fit([(0, 0, None)])


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


TEXTS = ["The soup was cold. The waiter, however, was very kind and quick.",
         "Great place. Lovely staff. I will come back"]


def test_segment_rewards_from_a_builtin_reward(tok, tmp_path):
    rollouts = [{"id": f"p{i}-0", "prompt_id": f"p{i}", "prompt": "Review the restaurant.",
                 "response_ids": tok.encode(t) + [tok.eos_token_id], "text": t} for i, t in enumerate(TEXTS)]
    write_jsonl(rollouts, tmp_path / "rollouts.jsonl")
    cfg = SegmentConfig(unit="sentence", min_tokens=1)
    out = segment_rollouts(tmp_path / "rollouts.jsonl", tmp_path / "segment_labels.jsonl", tok, ["concise"], cfg)
    rows = load_segment_labels(out)
    a, b = rows["p0-0"], rows["p1-0"]
    assert a["texts"] == ["The soup was cold.", " The waiter, however, was very kind and quick."]
    assert b["texts"] == ["Great place.", " Lovely staff.", " I will come back"]
    # concise = 1 - words / 50 of the text up to each segment's end; the empty text scores 1
    assert a["empty"]["concise"] == 1.0
    assert a["prefix"]["concise"] == pytest.approx([1 - 4 / 50, 1 - 12 / 50])
    assert b["prefix"]["concise"] == pytest.approx([1 - 2 / 50, 1 - 4 / 50, 1 - 8 / 50])
    assert source_labels(b, "concise") == pytest.approx([-2 / 50, -2 / 50, -4 / 50])  # increments
    assert b["spans"][-1][1] == len(rollouts[1]["response_ids"])  # EOS inside the last span
    norms = load_normalizers(tmp_path / "segment_norm.json")
    starts = [span[0] for row in (a, b) for span in row["spans"]]
    assert max(starts) < 8 and norms["concise"].count == [5, 0, 0, 0, 0, 0]  # all in bucket 0 (8 tokens)
    # resumable: a second run with the same unit and rewards adds nothing; a new reward relabels
    segment_rollouts(tmp_path / "rollouts.jsonl", out, tok, ["concise"], cfg)
    assert len(out.read_text().splitlines()) == 2
    segment_rollouts(tmp_path / "rollouts.jsonl", out, tok, ["concise", "vader_compound"], cfg)
    rows = load_segment_labels(out)
    assert len(out.read_text().splitlines()) == 4 and set(rows["p0-0"]["prefix"]) == {"concise", "vader_compound"}
    assert rows["p1-0"]["prefix"]["vader_compound"][-1] > 0.5  # "Great place. Lovely staff." is positive


HEAD = HeadSpec(name="h", reward="r", reward_range=(0.0, 1.0))


def _row(spans, prefix, empty=0.0, critic=None):
    return {"spans": spans, "empty": {"r": empty}, "prefix": {"r": prefix}, "critic": {"h": critic} if critic else {}}


def test_dense_target_from_reward_increments_by_hand():
    # Two rollouts, 3 tokens each; normaliser by segment index (1 per bucket, min_count 1).
    rows = {"a": _row([[0, 1], [1, 3]], [0.2, 0.6]),  # increments 0.2, 0.4
            "b": _row([[0, 2], [2, 3]], [0.4, 0.4])}  # increments 0.4, 0.0
    # index 0: labels 0.2, 0.4 -> mean 0.3, std 0.1; index 1: 0.4, 0.0 -> mean 0.2, std 0.2
    rewards = [[0.6], [0.4]]
    t, summary = dense_targets(["a", "b"], [3, 3], rewards, [HEAD], rows, "reward", lam=0.5,
                               location="index", bucket=1, num_buckets=2, min_count=1)
    # a: future surprise after segment 0 is u_1 = 0.4 - 0.2 = 0.2 -> token 0: 0.6 - 0.5 * 0.2 = 0.5
    np.testing.assert_allclose(t[0][:, 0], [0.5, 0.6, 0.6])
    # b: u_1 = 0.0 - 0.2 = -0.2 -> tokens 0, 1: 0.4 + 0.1 = 0.5; last segment: the final reward
    np.testing.assert_allclose(t[1][:, 0], [0.5, 0.5, 0.4])
    assert summary["heads"]["h"]["used"] and summary["heads"]["h"]["normalizer"]["mean"] == pytest.approx([0.3, 0.2])
    # lambda 1: the reward so far + the location mean of what follows (a: 0.2 + 0.2 = 0.4)
    t1, _ = dense_targets(["a", "b"], [3, 3], rewards, [HEAD], rows, "reward", lam=1.0,
                          location="index", bucket=1, num_buckets=2, min_count=1)
    np.testing.assert_allclose(t1[0][:, 0], [0.4, 0.6, 0.6])
    # lambda 0, no row, or spans that do not tile the response: the final reward
    t0, _ = dense_targets(["a", "b"], [3, 3], rewards, [HEAD], rows, "reward", lam=0.0,
                          location="index", bucket=1, num_buckets=2, min_count=1)
    np.testing.assert_allclose(np.concatenate(t0)[:, 0], [0.6] * 3 + [0.4] * 3)
    tn, _ = dense_targets(["a", "c"], [4, 3], rewards, [HEAD], rows, "reward", lam=0.5)
    np.testing.assert_allclose(np.concatenate(tn)[:, 0], [0.6] * 4 + [0.4] * 3)


def test_dense_target_from_critic_ratings_by_hand():
    # ratings at index 0 and 1; rollout c's second rating is missing (z = 0)
    rows = {"a": _row([[0, 1], [1, 2]], [0, 0], critic=[8, 9]),
            "b": _row([[0, 1], [1, 2]], [0, 0], critic=[2, 1]),
            "c": _row([[0, 1], [1, 2]], [0, 0], critic=[5, None])}
    rewards = [[0.9], [0.1], [0.5]]
    t, summary = dense_targets(["a", "b", "c"], [2, 2, 2], rewards, [HEAD], rows, "critic", lam=1.0, clip=10,
                               location="index", bucket=1, num_buckets=2, min_count=1, std_floor=0.0)
    # index 0: 8, 2, 5 -> mean 5, std sqrt(6); index 1: 9, 1 -> mean 5, std 4
    za = np.array([3 / 6**0.5, 1.0])
    zb = np.array([-3 / 6**0.5, -1.0])
    sums = np.array([za.sum(), zb.sum(), 0.0])
    r = np.array([0.9, 0.1, 0.5])
    slope = ((sums - sums.mean()) * (r - r.mean())).mean() / sums.var()
    assert summary["heads"]["h"]["slope"] == pytest.approx(slope)
    np.testing.assert_allclose(t[0][:, 0], [0.9 - slope * 1.0, 0.9])
    np.testing.assert_allclose(t[1][:, 0], [0.1 + slope * 1.0, 0.1])
    np.testing.assert_allclose(t[2][:, 0], [0.5, 0.5])  # its future rating is missing: no shift
    # a critic that disagrees with the reward (high ratings, low reward) gets slope 0: no shift
    flipped = {k: _row(r["spans"], [0, 0], critic=[11 - v if v else None for v in r["critic"]["h"]])
               for k, r in rows.items()}
    tf, sf = dense_targets(["a", "b", "c"], [2, 2, 2], rewards, [HEAD], flipped, "critic", lam=1.0,
                           location="index", bucket=1, num_buckets=2, min_count=1)
    assert sf["heads"]["h"]["slope"] == 0.0
    np.testing.assert_allclose(np.concatenate(tf)[:, 0], [0.9, 0.9, 0.1, 0.1, 0.5, 0.5])
    # a reward source with no labels for the head leaves it on the final reward
    t2, s2 = dense_targets(["a"], [2], [[0.9]], [HeadSpec(name="h", reward="other")], rows, "reward")
    assert not s2["heads"]["h"]["used"] and t2[0][:, 0].tolist() == [0.9, 0.9]


def test_dense_lambda_out_of_range_is_refused():
    with pytest.raises(ValueError, match="lambda must be in"):
        dense_targets([], [], np.zeros((0, 1)), [HEAD], {}, lam=1.5)
    with pytest.raises(ValueError, match="source must be one of"):
        dense_targets(["a"], [1], [[0.0]], [HEAD], {"a": _row([[0, 1]], [0.0])}, "oracle")


def test_segment_labels_file_is_json_lines(tok, tmp_path):
    write_jsonl([{"id": "p0-0", "prompt_id": "p0", "prompt": "x", "response_ids": tok.encode("Hi. Bye."),
                  "text": "Hi. Bye."}], tmp_path / "rollouts.jsonl")
    out = segment_rollouts(tmp_path / "rollouts.jsonl", tmp_path / "s.jsonl", tok, ["readable"],
                           SegmentConfig(unit="sentence", min_tokens=1))
    assert json.loads(out.read_text())["spans"] == [[0, 2], [2, len(tok.encode("Hi. Bye."))]]
