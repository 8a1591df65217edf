"""Ensemble heads: the checkpoint format (old single-projection checkpoints load unchanged) and a
tiny training run whose spread is larger on prefixes unlike its training data."""

from __future__ import annotations

import json

import pytest
import torch

from prefix_scorers.base_model import load_model, load_tokenizer
from prefix_scorers.checkpoint import DEFAULT_HEADS, load_scorer, random_scorer, save_scorer
from prefix_scorers.cli import DEFAULT_OUT
from prefix_scorers.config import EnsembleSpec, ScorerConfig
from prefix_scorers.labels import label_rollouts
from prefix_scorers.prompts import load_prompts, read_jsonl, write_jsonl
from prefix_scorers.rollouts import RolloutConfig, generate_rollouts
from prefix_scorers.train import TrainConfig, train


class _Tok:
    def get_vocab(self):
        return {f"t{i}": i for i in range(50)}


def test_an_old_single_projection_checkpoint_loads_unchanged(smollm2_dir):
    """prefix_scorers/default was written before ensembles existed: format_version 1, no
    `ensemble` key, head_proj (H, d_e, d). It loads as one projection per head and values tokens
    exactly as the single-projection formula says."""
    raw = json.loads((DEFAULT_OUT / "config.json").read_text())
    assert raw["format_version"] == 1 and "ensemble" not in raw
    tok = load_tokenizer(smollm2_dir)
    emb = load_model(smollm2_dir).get_input_embeddings().weight.detach().float()
    scorer = load_scorer(DEFAULT_OUT, tok, emb)
    H = len(raw["heads"])
    assert scorer.ensemble_size == 1 and scorer.head_proj.shape[0] == H and scorer.head_bias.shape == (H,)
    ids = torch.tensor([tok.encode("The food was great and the staff were friendly.")])
    q = scorer(ids).queries[0, -1]  # (H, d_e)
    torch.testing.assert_close(scorer.values(q[None])[0], q @ emb.T + scorer.head_bias[:, None])
    w, mean, std = torch.tensor([[1.0, 0.5, 0, -1]]), torch.full((1, H), 0.2), torch.full((1, H), 2.0)
    old = ((q @ emb.T + scorer.head_bias[:, None] - 0.2) / 2.0 * w[0, :, None]).sum(0)
    torch.testing.assert_close(scorer.combined_values(q[None], mean, std, w)[0], old, atol=1e-4, rtol=1e-4)


def test_single_projection_checkpoints_are_still_written_as_version_1(tmp_path):
    save_scorer(random_scorer(50, _Tok(), DEFAULT_HEADS[:2], hidden_size=8, num_layers=1), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["format_version"] == 1 and "ensemble" not in raw


def test_ensemble_checkpoint_round_trip_and_refusals(tmp_path):
    s = random_scorer(50, _Tok(), DEFAULT_HEADS[:2], hidden_size=8, num_layers=1, ensemble=EnsembleSpec(size=3))
    save_scorer(s, tmp_path / "ens")
    raw = json.loads((tmp_path / "ens" / "config.json").read_text())
    assert raw["format_version"] == 2 and raw["ensemble"]["size"] == 3
    back = load_scorer(tmp_path / "ens", _Tok())
    assert back.ensemble_size == 3 and back.head_proj.shape[0] == 6
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(back.score(ids), s.score(ids))
    # the ensemble mean, mixed before the vocabulary, equals averaging every member's values
    q = back(ids).queries[:, -1]  # (1, 6, d_e)
    ones = torch.ones(1, 2)
    torch.testing.assert_close(back.combined_values(q, 0 * ones, ones, ones),
                               back.values(q).view(1, 2, 3, -1).mean(2).sum(1), atol=1e-5, rtol=1e-5)
    # a version-1 config may not declare an ensemble; weights must match the ensemble size
    with pytest.raises(ValueError, match="format_version=1 with ensemble"):
        ScorerConfig.model_validate({**raw, "format_version": 1})
    cfg = ScorerConfig.load(tmp_path / "ens")
    cfg.ensemble = EnsembleSpec(size=4)
    cfg.save(tmp_path / "ens")
    with pytest.raises(ValueError, match=r"hold \(6,\) head projections, config.json asks for 8"):
        load_scorer(tmp_path / "ens", _Tok())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    run = tmp_path_factory.mktemp("ens-run")
    prompts = write_jsonl(load_prompts("train")[:12], run / "prompts.jsonl")
    cfg = RolloutConfig(samples_per_prompt=2, max_new_tokens=10, batch_size=8, store_top_k=4)
    generate_rollouts(tiny_model_dir, prompts, run / "rollouts.jsonl", cfg)
    label_rollouts(run / "rollouts.jsonl", run / "labels.jsonl", [h.reward for h in DEFAULT_HEADS])
    return run


def test_ensemble_spread_is_larger_off_the_training_data(run_dir, tiny_model_dir, tmp_path):
    """E=4 members trained on bootstrap resamples of 24 rollouts: on prefixes of random tokens
    (nothing like the model's own samples) the members disagree more than on the training
    prefixes, for every head."""
    cfg = TrainConfig(objective="fudge", epochs=8, batch_size=4, lr=3e-4, head_lr=3e-3, num_layers=1,
                      eval_fraction=0.0, warmup_steps=2, norm_positions=10, ensemble=4, ensemble_prior=10.0)
    out = train(run_dir / "rollouts.jsonl", run_dir / "labels.jsonl", tmp_path / "train", cfg, tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    scorer = load_scorer(out, tok, load_model(tiny_model_dir).get_input_embeddings().weight.detach().float())
    assert scorer.config.ensemble.size == 4 and scorer.config.provenance.train_config["ensemble"] == 4

    def spread(ids: list[int], start: int) -> torch.Tensor:
        """Each head's spread (T', H) at the response tokens, at the token taken."""
        q = scorer(torch.tensor([ids])).queries[0, start - 1:-1]  # (T', H*E, d_e)
        taken = scorer.values_at(q, torch.tensor(ids[start:])[:, None])  # (T', H*E, 1)
        return taken[..., 0].view(len(ids) - start, 4, 4).std(2)

    rows = read_jsonl(run_dir / "rollouts.jsonl")
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([spread(r["prompt_ids"] + r["response_ids"], len(r["prompt_ids"])) for r in rows])
    unseen = torch.cat([spread(torch.randint(len(tok), (len(r["prompt_ids"]) + len(r["response_ids"]),),
                                             generator=g).tolist(), len(r["prompt_ids"])) for r in rows])
    ratio = unseen.mean(0) / seen.mean(0)  # per head
    assert bool((ratio > 1.3).all()), ratio
