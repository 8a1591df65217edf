"""Continued training (`train --init-from`): a scorer started from a trained checkpoint has its
weights, heads matched by name, and a checkpoint of another shape or other heads is refused."""

from __future__ import annotations

import json

import pytest
import torch

from prefix_scorers.base_model import load_model, load_tokenizer
from prefix_scorers.checkpoint import DEFAULT_HEADS, init_from_base, load_scorer, save_scorer
from prefix_scorers.cli import main
from prefix_scorers.prompts import write_jsonl
from prefix_scorers.train import TrainConfig, train
from prefix_scorers.warm_start import init_from_checkpoint


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def _trained(base, tmp_path, heads=DEFAULT_HEADS, num_layers=1):
    """A checkpoint whose every weight differs from a fresh scorer's (as training leaves it)."""
    model, tok = base
    scorer = init_from_base(model, tok, heads, num_layers=num_layers, seed=7)
    with torch.no_grad():
        for p in scorer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        scorer.head_bias.copy_(torch.arange(len(heads), dtype=torch.float32) / 10)
    return scorer, save_scorer(scorer, tmp_path / "trained")


def _weights(scorer):
    return {k: v.clone() for k, v in scorer.state_dict().items() if k not in ("norm_mean", "norm_std")}


def test_init_from_copies_every_weight_and_matches_heads_by_name(base, tmp_path):
    model, tok = base
    trained, ckpt = _trained(base, tmp_path)
    fresh = init_from_base(model, tok, DEFAULT_HEADS, num_layers=1, seed=0)
    record = init_from_checkpoint(fresh, ckpt)
    want = _weights(trained)
    assert set(_weights(fresh)) == set(want)
    for k, v in _weights(fresh).items():
        assert torch.equal(v, want[k]), k
    assert record["path"] == str(ckpt) and record["dtype"] == "float32"

    # the same heads listed in another order: each head gets its own projection and bias
    reordered = [DEFAULT_HEADS[i] for i in (2, 0, 3, 1)]
    other = init_from_base(model, tok, reordered, num_layers=1, seed=0)
    init_from_checkpoint(other, ckpt)
    for i, j in enumerate((2, 0, 3, 1)):
        assert torch.equal(other.head_proj[i], trained.head_proj[j])
        assert other.head_bias[i] == trained.head_bias[j]


def test_init_from_refuses_another_depth_or_other_heads(base, tmp_path):
    model, tok = base
    _, ckpt = _trained(base, tmp_path)
    deeper = init_from_base(model, tok, DEFAULT_HEADS, num_layers=2, seed=0)
    with pytest.raises(ValueError, match=r"num_layers 1 in the checkpoint vs 2 here.*--num-layers"):
        init_from_checkpoint(deeper, ckpt)
    renamed = [DEFAULT_HEADS[0].model_copy(update={"name": "happy"}), *DEFAULT_HEADS[1:]]
    with pytest.raises(ValueError, match=r"missing in the checkpoint: \['happy'\], not trained here: \['positive'\]"):
        init_from_checkpoint(init_from_base(model, tok, renamed, num_layers=1, seed=0), ckpt)
    other_reward = [DEFAULT_HEADS[0].model_copy(update={"reward": "civility", "reward_range": (0.0, 1.0)}),
                    *DEFAULT_HEADS[1:]]
    with pytest.raises(ValueError, match=r"head 'positive' was trained on reward 'vader_compound'"):
        init_from_checkpoint(init_from_base(model, tok, other_reward, num_layers=1, seed=0), ckpt)


def test_a_retargeted_head_continues_on_a_corrected_reward_of_the_same_range(base, tmp_path):
    """`--retarget-head specific` moves the head to another reward (as `specificity_english`
    replaced `specificity_distinct`) keeping its weights; another range, or a head not named, is
    still refused."""
    model, tok = base
    trained, ckpt = _trained(base, tmp_path)
    i = [h.name for h in DEFAULT_HEADS].index("specific")
    moved = [h.model_copy(update={"reward": "specificity"}) if h.name == "specific" else h for h in DEFAULT_HEADS]
    with pytest.raises(ValueError, match=r"head 'specific' .*--retarget-head specific"):
        init_from_checkpoint(init_from_base(model, tok, moved, num_layers=1, seed=0), ckpt)
    fresh = init_from_base(model, tok, moved, num_layers=1, seed=0)
    record = init_from_checkpoint(fresh, ckpt, retarget=("specific",))
    assert torch.equal(fresh.head_proj[i], trained.head_proj[i]) and fresh.head_bias[i] == trained.head_bias[i]
    assert record["retargeted"] == {"specific": {"from": DEFAULT_HEADS[i].reward, "to": "specificity"}}
    ranged = [h.model_copy(update={"reward": "vader_compound", "reward_range": (-1.0, 1.0)})
              if h.name == "specific" else h for h in DEFAULT_HEADS]
    with pytest.raises(ValueError, match=r"range \(0.0, 1.0\)\), this run's is 'vader_compound' \(range \(-1.0, 1.0\)"):
        init_from_checkpoint(init_from_base(model, tok, ranged, num_layers=1, seed=0), ckpt, retarget=("specific",))
    with pytest.raises(ValueError, match=r"--retarget-head \['happy'\]"):
        init_from_checkpoint(init_from_base(model, tok, moved, num_layers=1, seed=0), ckpt, retarget=("happy",))
    with pytest.raises(ValueError, match="pass --init-from too"):
        TrainConfig(retarget=("specific",))


def _tiny_run(run, tok, n=8):
    """Labelled rollouts written directly: 4 prompts x 2 answers of a few tokens."""
    rows, labels = [], []
    for i in range(n):
        prompt, answer = tok.encode(f"Question {i // 2}?"), tok.encode(f" Answer number {i} is fine.")
        rows.append({"id": f"p{i // 2}-{i % 2}", "prompt_id": f"p{i // 2}", "prompt_ids": prompt,
                     "response_ids": answer, "text": "", "topk_ids": [], "topk_logprobs": []})
        labels.append({"id": rows[-1]["id"], "rewards": {h.reward: 0.1 * (i % 5) for h in DEFAULT_HEADS}})
    write_jsonl(rows, run / "rollouts.jsonl")
    write_jsonl(labels, run / "labels.jsonl")
    return run


def test_training_continues_from_the_checkpoint(base, tiny_model_dir, tmp_path):
    """With both learning rates 0, a continued run's output is the checkpoint itself: training
    neither re-initialises the heads nor starts from the base model's layers; the provenance says
    where it started. A checkpoint of another depth stops the CLI before any training."""
    _, tok = base
    trained, ckpt = _trained(base, tmp_path)
    run = _tiny_run(tmp_path / "run", tok)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.0, head_lr=0.0, num_layers=1, eval_fraction=0.25,
                      warmup_steps=1, norm_positions=8, init_from=str(ckpt))
    out = train(run / "rollouts.jsonl", run / "labels.jsonl", tmp_path / "cont", cfg, tiny_model_dir)
    emb = load_model(tiny_model_dir).get_input_embeddings().weight.detach().float()
    continued = load_scorer(out, tok, emb)
    want = _weights(trained)
    for k, v in _weights(continued).items():
        assert torch.equal(v, want[k]), k
    prov = json.loads((out / "config.json").read_text())["provenance"]
    assert prov["init_from"]["path"] == str(ckpt) and prov["train_config"]["init_from"] == str(ckpt)

    with pytest.raises(ValueError, match="num_layers 1 in the checkpoint vs 2 here"):
        main(["train", "--run-dir", str(run), "--base-model", str(tiny_model_dir), "--epochs", "1",
              "--num-layers", "2", "--init-from", str(ckpt), "--train-dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused" / "scorer").exists()
