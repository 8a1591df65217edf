"""The labels stage: labelling a run again with other rewards adds them to each rollout's labels."""

from __future__ import annotations

from prefix_scorers.labels import label_rollouts, load_labels
from prefix_scorers.prompts import write_jsonl


def test_labelling_again_with_another_reward_keeps_the_first_ones(tmp_path):
    rollouts = write_jsonl([{"id": "a", "text": "I love it."}, {"id": "b", "text": "one two three"}],
                           tmp_path / "rollouts.jsonl")
    labels = tmp_path / "labels.jsonl"
    label_rollouts(rollouts, labels, ["concise"])
    label_rollouts(rollouts, labels, ["vader_compound"])
    got = load_labels(labels)
    assert set(got) == {"a", "b"}
    assert got["b"]["concise"] == 1 - 3 / 50 and got["b"]["vader_compound"] == 0.0
    assert got["a"]["concise"] == 1 - 3 / 50 and got["a"]["vader_compound"] > 0.5
    label_rollouts(rollouts, labels, ["concise", "vader_compound"])  # both there: nothing appended
    assert len(labels.read_text().splitlines()) == 4
