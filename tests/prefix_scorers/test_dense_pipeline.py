"""`prefix-scorers label --segments` then `train --target dense` on the tiny model: the dense
targets reach training, the normalisers are saved with the labels and the scorer, and the
exported scorer loads."""

from __future__ import annotations

import json

import pytest
import torch

from prefix_scorers.base_model import load_model, load_tokenizer
from prefix_scorers.checkpoint import load_scorer
from prefix_scorers.cli import main
from prefix_scorers.prompts import load_prompts, read_jsonl, write_jsonl
from prefix_scorers.rollouts import RolloutConfig, generate_rollouts
from prefix_scorers.train import TrainConfig


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, tiny_model_dir):
    run = tmp_path_factory.mktemp("dense-run")
    prompts = write_jsonl(load_prompts("train")[:10], run / "prompts.jsonl")
    cfg = RolloutConfig(samples_per_prompt=2, max_new_tokens=16, batch_size=10, store_top_k=2)
    generate_rollouts(tiny_model_dir, prompts, run / "rollouts.jsonl", cfg)
    main(["label", "--run-dir", str(run), "--base-model", str(tiny_model_dir), "--segments", "clause",
          "--segment-min-tokens", "1", *HEADS])
    return run


HEADS = ["--head", "concise=concise", "--head", "positive=vader_compound"]


def test_label_segments_then_train_dense_exports_a_loadable_scorer(dense_run, tiny_model_dir, tmp_path, capsys):
    run, base, heads = str(dense_run), str(tiny_model_dir), HEADS
    rows = read_jsonl(dense_run / "segment_labels.jsonl")
    rollouts = {r["id"]: r for r in read_jsonl(dense_run / "rollouts.jsonl")}
    assert len(rows) == 20
    for row in rows:  # spans tile each response; the last prefix reward is the rollout's own label
        assert row["spans"][0][0] == 0 and row["spans"][-1][1] == len(rollouts[row["id"]]["response_ids"])
    labels = {r["id"]: r["rewards"] for r in read_jsonl(dense_run / "labels.jsonl")}
    assert all(row["prefix"]["concise"][-1] == pytest.approx(labels[row["id"]]["concise"]) for row in rows)
    assert set(json.loads((dense_run / "segment_norm.json").read_text())["sources"]) == {"concise", "vader_compound"}

    main(["train", "--run-dir", run, "--base-model", base, "--train-dir", str(tmp_path / "train"), "--epochs", "1",
          "--num-layers", "1", "--batch-size", "8", "--target", "dense", "--dense-lambda", "0.7", *heads])
    capsys.readouterr()
    out = tmp_path / "train" / "scorer"
    prov = json.loads((out / "config.json").read_text())["provenance"]
    assert prov["train_config"]["target"] == "dense" and prov["train_config"]["dense_lambda"] == 0.7
    dense = prov["dense_targets"]
    assert dense["heads"]["concise"]["used"] and dense["heads"]["concise"]["mean_abs_shift"] > 0
    assert set(json.loads((tmp_path / "train" / "segment_norm.json").read_text())["sources"]) == {"concise", "positive"}

    main(["export", "--run-dir", run, "--base-model", base, "--src", str(out), "--out", str(tmp_path / "exported")])
    tok = load_tokenizer(tiny_model_dir)
    emb = load_model(tiny_model_dir).get_input_embeddings().weight.detach().float()
    scorer = load_scorer(tmp_path / "exported", tok, emb)
    values = scorer.score(torch.tensor([tok.encode("Short. Sweet.")]))
    assert values.shape[-2] == 2 and torch.isfinite(values).all()


def test_dense_targets_reach_the_training_batches(dense_run, tiny_model_dir, monkeypatch, tmp_path):
    """The loss sees the dense targets (not the final rewards) at non-final segments."""
    import prefix_scorers.train as train_mod

    seen = []
    real = train_mod.batch_loss

    def spy(scorer, batch, objective, *a, **kw):
        if scorer.training:
            seen.append((batch.targets.clone(), batch.rewards.clone(), batch.taken.clone()))
        return real(scorer, batch, objective, *a, **kw)

    monkeypatch.setattr(train_mod, "batch_loss", spy)
    cfg = TrainConfig(target="dense", dense_lambda=1.0, epochs=1, batch_size=8, num_layers=1, eval_fraction=0.2,
                      heads=[{"name": "concise", "reward": "concise", "reward_range": (0.0, 1.0)}])
    train_mod.train(dense_run / "rollouts.jsonl", dense_run / "labels.jsonl", tmp_path / "t", cfg, tiny_model_dir)
    differs = sum(int(((t[..., 0] - r[:, None, 0]).abs() > 1e-6)[m].sum()) for t, r, m in seen)
    assert seen and differs > 0  # some positions regress onto something other than the final reward


def test_dense_target_without_segment_labels_names_the_fix(tmp_path, tiny_model_dir, dense_run):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("rollouts.jsonl", "labels.jsonl"):
        (run / name).write_text((dense_run / name).read_text())
    with pytest.raises(ValueError, match="label --segments"):
        main(["train", "--run-dir", str(run), "--base-model", str(tiny_model_dir), "--epochs", "1",
              "--num-layers", "1", "--target", "dense", "--head", "concise=concise"])
