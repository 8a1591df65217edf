"""Branching rollouts (branches.py): points and candidates drawn from a source rollout, branch rows
assembled as rollouts that training values only from the branch point on, and the stage run on the
tiny model (resumable, through the CLI)."""

from __future__ import annotations

import numpy as np
import pytest

from prefix_scorers.branches import Branch, BranchConfig, branch_points, branch_row, budget
from prefix_scorers.cli import main
from prefix_scorers.prompts import load_prompts, read_jsonl, write_jsonl
from prefix_scorers.rollouts import RolloutConfig, generate_rollouts
from prefix_scorers.train import Example, collate, with_targets

EOS = 2
SOURCE = {"id": "p1-0", "prompt_id": "p1", "prompt": "Hi", "prompt_ids": [1, 5], "response_ids": [10, 11, 12, EOS],
          "finished": True, "topk_ids": [[10, 20, 30], [11, 21, 31], [12, EOS, 32], [EOS, 23, 33]],
          "topk_logprobs": [[-0.1, -2.0, -3.0]] * 4}


def test_branch_points_are_distinct_seeded_and_take_the_most_likely_candidates():
    cfg = BranchConfig(points=2, candidates=2, rollout=RolloutConfig(seed=3))
    branches = branch_points(SOURCE, cfg)
    assert branches == branch_points(SOURCE, cfg)  # a resumed run draws the same
    ts = sorted({b.t for b in branches})
    assert len(ts) == 2 and all(0 <= t < 4 for t in ts)
    for b in branches:
        assert b.token in SOURCE["topk_ids"][b.t][:2]
    assert len(branches) == 4 and len({b.id for b in branches}) == 4
    # more points than positions: every position once
    assert sorted({b.t for b in branch_points(SOURCE, BranchConfig(points=9, candidates=1))}) == [0, 1, 2, 3]
    assert branch_points({**SOURCE, "response_ids": [], "topk_ids": []}, cfg) == []
    with pytest.raises(ValueError, match="points and candidates"):
        BranchConfig(points=0)


def test_branch_row_keeps_the_prefix_forces_the_candidate_and_masks_before_it():
    cfg = BranchConfig(rollout=RolloutConfig(max_new_tokens=4))
    b = Branch(SOURCE, 1, 21)
    assert b.prefix() == [1, 5, 10, 21]
    assert budget(b, cfg, {EOS}) == 2 and budget(Branch(SOURCE, 2, EOS), cfg, {EOS}) == 0
    assert budget(Branch(SOURCE, 3, 23), cfg, {EOS}) == 0  # the last position: nothing left to sample
    cont = {"response_ids": [40, EOS], "finished": True, "topk_ids": [[40, 41, 42], [EOS, 43, 44]],
            "topk_logprobs": [[-0.5, -1.0, -2.0]] * 2}
    row = branch_row(b, cont, {EOS})
    assert row["response_ids"] == [10, 21, 40, EOS] and row["finished"]
    assert row["topk_ids"] == [[10, 20, 30], [11, 21, 31], [40, 41, 42], [EOS, 43, 44]]  # t's candidates: the source's
    assert (row["roll_in"], row["branch_of"], row["branch_at"]) == (2, "p1-0", 1)
    ended = branch_row(Branch(SOURCE, 2, EOS), {"response_ids": [], "finished": False, "topk_ids": [],
                                                "topk_logprobs": []}, {EOS})
    assert ended["response_ids"] == [10, 11, EOS] and ended["finished"]

    # training regresses the branch's reward onto the values of positions >= t only (the candidate on)
    ex = [Example(r["id"], "p1", r["prompt_ids"] + r["response_ids"], 2, [v], r["topk_ids"], r["topk_logprobs"],
                  roll_in=r.get("roll_in", 0)) for r, v in ((SOURCE, 0.0), (row, 1.0))]
    batch = collate(ex, 0, "cpu", with_next=False)
    assert batch.taken[0].tolist() == [False, True, True, True, True]  # the source: every response position
    assert batch.taken[1].tolist() == [False, False, True, True, True]  # the branch: from its candidate (t = 1) on
    # the pooled target of the source's shared prefix [10] is its own reward: the branch does not join it
    mean = with_targets(ex, "mean", None)
    assert np.allclose(mean[0].targets, [[0.0]] * 4)
    assert np.allclose(mean[1].targets, [[1.0]] * 4)


def test_branches_stage_on_the_tiny_model(tmp_path, tiny_model_dir):
    src = tmp_path / "src"
    prompts = write_jsonl(load_prompts("train")[:3], tmp_path / "prompts.jsonl")
    generate_rollouts(tiny_model_dir, prompts, src / "rollouts.jsonl",
                      RolloutConfig(samples_per_prompt=1, max_new_tokens=8, batch_size=3, store_top_k=3))
    out = tmp_path / "branches"
    args = ["branches", "--from-run-dir", str(src), "--run-dir", str(out), "--base-model", str(tiny_model_dir),
            "--points", "2", "--candidates", "3", "--max-new-tokens", "8"]
    main(args)
    sources = {r["id"]: r for r in read_jsonl(src / "rollouts.jsonl")}
    rows = read_jsonl(out / "rollouts.jsonl")
    assert len(rows) == sum(3 * min(2, len(r["response_ids"])) for r in sources.values())
    for row in rows:
        s, t = sources[row["branch_of"]], row["branch_at"]
        assert row["response_ids"][:t] == s["response_ids"][:t]
        assert row["response_ids"][t] in s["topk_ids"][t]
        assert len(row["response_ids"]) <= 8 and len(row["topk_ids"]) == len(row["response_ids"])
        assert row["roll_in"] == t + 1 and row["prompt_ids"] == s["prompt_ids"]
    main(args)  # resumable: nothing left to do, nothing written twice
    assert len(read_jsonl(out / "rollouts.jsonl")) == len(rows)
    with pytest.raises(SystemExit, match="has no rollouts.jsonl"):
        main([*args[:2], str(tmp_path / "missing"), *args[3:]])
