"""On-policy rounds (prefix_scorers/roll_in.py) on a tiny model: roll-in at strength 0 over the whole
vocabulary is plain sampling token for token; steered roll-ins change the rollouts, record their
switch points, and training regresses only the values of prefixes the base model continued."""

from __future__ import annotations

import pytest
import torch

from prefix_scorers.checkpoint import DEFAULT_HEADS
from prefix_scorers.labels import label_rollouts
from prefix_scorers.prompts import load_prompts, read_jsonl, write_jsonl
from prefix_scorers.roll_in import RollIn, parse_weights, switch_point
from prefix_scorers.rollouts import RolloutConfig, generate_rollouts
from prefix_scorers.train import batch_loss, collate, load_examples, taken_values

CFG = {"samples_per_prompt": 2, "max_new_tokens": 12, "batch_size": 8, "store_top_k": 4, "seed": 3}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(load_prompts("train")[:4], tmp_path_factory.mktemp("p") / "prompts.jsonl")


def _rollouts(tiny_model_dir, prompts, out, roll_in=None):
    generate_rollouts(tiny_model_dir, prompts, out, RolloutConfig(**CFG, roll_in=roll_in))
    return {r["id"]: r for r in read_jsonl(out)}


def test_strength_zero_over_the_whole_vocabulary_is_plain_sampling(tiny_model_dir, tiny_scorer_dir, prompts, tmp_path):
    plain = _rollouts(tiny_model_dir, prompts, tmp_path / "plain.jsonl")
    zero = _rollouts(tiny_model_dir, prompts, tmp_path / "zero.jsonl",
                     RollIn(str(tiny_scorer_dir), {"positive": 1.0}, strength=0.0, top_k=0))
    assert plain.keys() == zero.keys()
    for rid, r in plain.items():
        assert zero[rid]["response_ids"] == r["response_ids"]
        assert zero[rid]["topk_ids"] == r["topk_ids"]  # stored base distributions, not the steered ones
        assert zero[rid]["roll_in"] == switch_point(CFG["seed"], rid, CFG["max_new_tokens"])
        assert "roll_in" not in r
    assert len({r["roll_in"] for r in zero.values()}) > 1  # switch points vary per rollout


def test_a_roll_in_top_k_over_the_vocabulary_keeps_every_token(tiny_model_dir, tiny_scorer_dir, prompts, tmp_path):
    whole = _rollouts(tiny_model_dir, prompts, tmp_path / "whole.jsonl",
                      RollIn(str(tiny_scorer_dir), {"positive": 1.0}, strength=8.0, top_k=0))
    over = _rollouts(tiny_model_dir, prompts, tmp_path / "over.jsonl",  # the tiny model has 49,152 tokens
                     RollIn(str(tiny_scorer_dir), {"positive": 1.0}, strength=8.0, top_k=100_000))
    assert {rid: r["response_ids"] for rid, r in over.items()} == {rid: r["response_ids"] for rid, r in whole.items()}


def test_roll_in_positions_are_masked_in_training(tiny_model_dir, tiny_scorer_dir, prompts, tmp_path):
    plain = _rollouts(tiny_model_dir, prompts, tmp_path / "plain.jsonl")
    steered = _rollouts(tiny_model_dir, prompts, tmp_path / "rollouts.jsonl",
                        RollIn(str(tiny_scorer_dir), {"positive": 1.0}, strength=8.0, top_k=20))
    changed = [rid for rid, r in steered.items() if r["response_ids"] != plain[rid]["response_ids"]]
    assert changed and all(steered[rid]["roll_in"] > 0 for rid in changed)  # steering did something
    label_rollouts(tmp_path / "rollouts.jsonl", tmp_path / "labels.jsonl", [h.reward for h in DEFAULT_HEADS])
    examples = load_examples(tmp_path / "rollouts.jsonl", tmp_path / "labels.jsonl", DEFAULT_HEADS)
    assert any(0 < e.roll_in < len(e.input_ids) - e.prompt_len for e in examples)
    batch = collate(examples, 0, "cpu", with_next=False)
    for b, e in enumerate(examples):
        s, L = e.prompt_len, len(e.input_ids) - e.prompt_len
        first = s - 1 + max(0, min(e.roll_in, L) - 1)  # the value of y_<=j for j >= t - 1; the last always
        want = torch.zeros(batch.taken.shape[1], dtype=torch.bool)
        want[first:s - 1 + L] = True
        assert torch.equal(batch.taken[b], want), (e.id, e.roll_in, L)

    # the loss is the mean squared error over exactly those positions
    from prefix_scorers.base_model import load_model, load_tokenizer
    from prefix_scorers.checkpoint import load_scorer

    tok = load_tokenizer(tiny_model_dir)
    scorer = load_scorer(tiny_scorer_dir, tok, load_model(tiny_model_dir).get_input_embeddings().weight.detach())
    inv_var = torch.ones(len(DEFAULT_HEADS))
    with torch.no_grad():
        _, per_head = batch_loss(scorer, batch, "fudge", inv_var)
        pred = taken_values(scorer, scorer(batch.input_ids, valid=batch.valid).queries, batch.input_ids)
        err = (pred - batch.rewards[:, None, :]) ** 2  # (B, T-1, H)
        want = torch.cat([err[b][batch.taken[b]] for b in range(len(examples))]).mean(0)
    assert torch.allclose(per_head, want, atol=1e-5)


def test_roll_in_settings_are_checked():
    assert parse_weights(["positive=1", "concise=-0.5"]) == {"positive": 1.0, "concise": -0.5}
    with pytest.raises(ValueError, match="head=number"):
        parse_weights(["positive"])
    with pytest.raises(ValueError, match="non-zero weight"):
        RollIn("x", {"positive": 0.0})
    with pytest.raises(ValueError, match="engine 'hf'"):
        RolloutConfig(engine="vllm", roll_in=RollIn("x"))
