"""A tiny end-to-end run of every stage: rollouts from a tiny random Llama, real reward labels,
both training objectives, export in bfloat16, and loading the result as the server does."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prefix_scorers.base_model import load_model, load_tokenizer
from prefix_scorers.checkpoint import DEFAULT_HEADS, load_scorer
from prefix_scorers.cli import main
from prefix_scorers.export import export_scorer
from prefix_scorers.labels import label_rollouts
from prefix_scorers.prompts import load_prompts, read_jsonl, write_jsonl
from prefix_scorers.rollouts import RolloutConfig, generate_rollouts
from prefix_scorers.train import TrainConfig, train

REWARDS = [h.reward for h in DEFAULT_HEADS]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    run = tmp_path_factory.mktemp("run")
    prompts = write_jsonl(load_prompts("train")[:12], run / "prompts.jsonl")
    cfg = RolloutConfig(samples_per_prompt=2, max_new_tokens=10, batch_size=8, store_top_k=4)
    generate_rollouts(tiny_model_dir, prompts, run / "rollouts.jsonl", cfg, limit=6)
    generate_rollouts(tiny_model_dir, prompts, run / "rollouts.jsonl", cfg)  # resumes: adds the rest
    label_rollouts(run / "rollouts.jsonl", run / "labels.jsonl", REWARDS)
    return run


def test_rollouts_resume_without_duplicates(run_dir):
    rows = read_jsonl(run_dir / "rollouts.jsonl")
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24
    for r in rows:
        assert 1 <= len(r["response_ids"]) <= 10
        assert len(r["topk_ids"]) == len(r["response_ids"]) and len(r["topk_ids"][0]) == 4
    labels = read_jsonl(run_dir / "labels.jsonl")
    assert len(labels) == 24 and set(labels[0]["rewards"]) == set(REWARDS)


def _config(objective):
    return TrainConfig(objective=objective, epochs=8, batch_size=4, lr=3e-4, head_lr=3e-3, num_layers=1,
                       eval_fraction=0.25, eval_every=5, warmup_steps=2, norm_positions=10)


@pytest.mark.parametrize("objective", ["fudge", "cdq"])
def test_training_reduces_loss_and_exports(run_dir, tiny_model_dir, tmp_path, objective):
    out = train(run_dir / "rollouts.jsonl", run_dir / "labels.jsonl", tmp_path / "train", _config(objective),
                tiny_model_dir)
    history = json.loads((tmp_path / "train" / "history.json").read_text())
    losses = [v for _, v in history["train"]]
    last_epoch = losses[-(len(losses) // 8):]
    assert sum(last_epoch) / len(last_epoch) < 0.5 * losses[0], (losses[0], last_epoch)
    assert (tmp_path / "train" / "loss.png").stat().st_size > 1000

    exported = export_scorer(out, tmp_path / "exported", dtype="bfloat16")
    assert (exported / "model.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size
    tok = load_tokenizer(tiny_model_dir)
    emb = load_model(tiny_model_dir).get_input_embeddings().weight.detach().float()
    scorer = load_scorer(exported, tok, emb)  # bfloat16 weights, cast to float32 on load
    assert scorer.head_proj.dtype == torch.float32
    cfg = scorer.config
    assert cfg.provenance.trained and cfg.provenance.objective == objective
    assert cfg.head_names == [h.name for h in DEFAULT_HEADS]
    assert scorer.norm_mean.shape == (4, 10) and bool((scorer.norm_std > 0).all())
    full = load_scorer(out, tok, emb)
    ids = torch.tensor([tok.encode("Hello there, how are you?")])
    # bfloat16 weights change the values only slightly
    assert torch.allclose(scorer.score(ids), full.score(ids), atol=0.1)


def test_cli_stages(run_dir, tiny_model_dir, tmp_path):
    main(["label", "--run-dir", str(run_dir)])  # everything labelled already: a no-op
    assert len(read_jsonl(run_dir / "labels.jsonl")) == 24
    main(["train", "--run-dir", str(run_dir), "--base-model", str(tiny_model_dir), "--epochs", "1",
          "--num-layers", "1", "--batch-size", "8"])
    main(["export", "--run-dir", str(run_dir), "--base-model", str(tiny_model_dir), "--out",
          str(tmp_path / "cli-export")])
    assert (tmp_path / "cli-export" / "config.json").is_file()


def test_cli_soft_target_bce_loss_held_out_run(run_dir, tiny_model_dir, tmp_path, capsys):
    """prefix-scorers train with the soft target and the BCE loss, evaluated on another run's
    prompts, exports a scorer that loads; `evaluate` reports the same held-out R^2."""
    rows = read_jsonl(run_dir / "rollouts.jsonl")
    held_prompts = sorted({r["prompt_id"] for r in rows})[:3]
    for name in ("rollouts", "labels"):
        src = read_jsonl(run_dir / f"{name}.jsonl")
        ids = {r["id"] for r in rows if r["prompt_id"] in held_prompts}
        write_jsonl([r for r in src if r["id"] not in ids], tmp_path / "train-run" / f"{name}.jsonl")
        write_jsonl([r for r in src if r["id"] in ids], tmp_path / "held-run" / f"{name}.jsonl")
    base = ["--base-model", str(tiny_model_dir)]
    main(["train", "--run-dir", str(tmp_path / "train-run"), "--eval-run-dir", str(tmp_path / "held-run"),
          "--target", "soft", "--soft-eta", "0.5", "--loss", "bce", "--epochs", "2", "--num-layers", "1",
          "--batch-size", "8", *base])
    trained = tmp_path / "train-run" / "train" / "scorer"
    prov = json.loads((trained / "config.json").read_text())["provenance"]
    assert prov["train_config"]["target"] == "soft" and prov["train_config"]["loss"] == "bce"
    assert prov["data_size"] == 24  # 18 train + 6 held-out rollouts
    r2 = {h.name: prov["metrics"][f"eval_r2_final_{h.name}"] for h in DEFAULT_HEADS}
    assert all(math.isfinite(v) for v in r2.values())
    main(["export", "--run-dir", str(tmp_path / "train-run"), *base, "--out", str(tmp_path / "soft-export")])
    capsys.readouterr()
    main(["evaluate", "--run-dir", str(tmp_path / "held-run"), *base, "--scorer", str(trained)])
    report = json.loads(capsys.readouterr().out)
    assert report["rollouts"] == 6 and report["prompts"] == 3
    assert report["r2"]["final"] == pytest.approx(r2, abs=1e-3)
    # the held-out token signal (token_signal.py), also in the training metrics
    eff = {h.name: prov["metrics"][f"eval_token_efficiency_{h.name}"] for h in DEFAULT_HEADS}
    assert report["token_signal"]["efficiency"] == pytest.approx(eff, abs=1e-3)
    assert all(v > 0 for v in report["token_signal"]["tilt_variance"].values())
    # the scorer as a ranker (ranking.py; 2 rollouts per held-out prompt), also in the training metrics
    share = {h.name: prov["metrics"][f"eval_ranker_share_{h.name}"] for h in DEFAULT_HEADS}
    assert report["ranker"]["prompts"] == 3
    assert report["ranker"]["share_of_gain"] == pytest.approx(share, abs=1e-3)
    for h in DEFAULT_HEADS:  # a pick lies between the mean and the best reward
        lo, hi = report["ranker"]["all_rollouts"][h.name], report["ranker"]["true_picks"][h.name]
        assert lo - 1e-4 <= hi and 2 * lo - hi - 1e-4 <= report["ranker"]["scorer_picks"][h.name] <= hi + 1e-4
    # the same held-out rollouts picked by prompt from the full run
    write_jsonl([{"id": pid} for pid in held_prompts], tmp_path / "held-prompts.jsonl")
    main(["evaluate", "--run-dir", str(run_dir), *base, "--scorer", str(trained), "--prompts",
          str(tmp_path / "held-prompts.jsonl")])
    assert json.loads(capsys.readouterr().out)["r2"] == report["r2"]
    main(["train", "--run-dir", str(run_dir), "--eval-prompts", str(tmp_path / "held-prompts.jsonl"), "--epochs",
          "1", "--num-layers", "1", *base, "--train-dir", str(tmp_path / "by-prompt")])
    metrics = json.loads((tmp_path / "by-prompt" / "scorer" / "config.json").read_text())["provenance"]["metrics"]
    assert metrics["eval_r2_final_positive"] == pytest.approx(
        json.loads(capsys.readouterr().out.split("\n", 1)[1])["eval_r2_final_positive"])
    # held-out prompts that also train are refused
    with pytest.raises(ValueError, match="held-out prompts must not train"):
        main(["train", "--run-dir", str(run_dir), "--eval-run-dir", str(tmp_path / "held-run"), "--epochs", "1",
              "--num-layers", "1", *base, "--train-dir", str(tmp_path / "refused")])
