"""The scorer's forward pass, its KV-cached incremental step, the checkpoint format and the
fingerprint checks, on the real SmolLM2 weights and on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from prefix_scorers.base_model import load_model, load_tokenizer
from prefix_scorers.checkpoint import (
    DEFAULT_HEADS,
    FingerprintMismatch,
    init_from_base,
    load_scorer,
    random_scorer,
    save_scorer,
)
from prefix_scorers.kv_cache import KVCache


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return load_model(smollm2_dir), load_tokenizer(smollm2_dir)


def test_copied_layers_reproduce_the_base_model(smol):
    """init_from_base copies the first layers: the scorer's trunk equals the base's hidden states."""
    model, tok = smol
    scorer = init_from_base(model, tok, DEFAULT_HEADS, num_layers=2)
    ids = tok("The food was wonderful and the staff were kind.", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states[2]
        x = scorer.in_proj(torch.nn.functional.embedding(ids, scorer.embedding))
        mask = scorer._attention_mask(torch.ones_like(ids, dtype=torch.bool), ids.shape[1], 0)
        pos = torch.arange(ids.shape[1])[None]
        for i, block in enumerate(scorer.layers):
            x = block(x, pos, mask, None, i)
    assert torch.allclose(x, want, atol=1e-5)


def test_parameter_budget(smol):
    """The shipped architecture (2 copied layers + 4 heads) adds at most 15% of the base's
    parameters; the base embedding it reuses is not stored."""
    model, tok = smol
    base = sum(p.numel() for p in model.parameters())
    for layers in (2, 4):
        scorer = init_from_base(model, tok, DEFAULT_HEADS, num_layers=layers)
        assert scorer.parameter_count() / base <= 0.15
    assert "embed_weight" not in scorer.state_dict()


def test_incremental_values_equal_full_recompute(smol):
    """KV-cached steps (with left-padded batch rows of different lengths and placeholder tokens)
    give the same values as a full pass: max abs difference < 1e-4."""
    model, tok = smol
    scorer = init_from_base(model, tok, DEFAULT_HEADS, num_layers=2, seed=1)
    a = tok("I loved this film, truly one of the best.", add_special_tokens=False).input_ids
    b = tok("Terrible.", add_special_tokens=False).input_ids
    with torch.no_grad():
        full_a, full_b = scorer.score(torch.tensor([a])), scorer.score(torch.tensor([b]))
        # row a: prefill 4 tokens; row b joins later with 2 tokens; then step token by token
        ca, cb = KVCache.empty(2), KVCache.empty(2)
        qa = [scorer(torch.tensor([a[:4]]), cache=ca).queries]
        qb = [scorer(torch.tensor([b[:2]]), cache=cb).queries]
        cache = ca.extend(cb)  # left-padded batch of 2 rows
        ia, ib = 4, 2
        while ia < len(a) or ib < len(b):
            more_a, more_b = ia < len(a), ib < len(b)
            toks = torch.tensor([[a[ia] if more_a else 0], [b[ib] if more_b else 0]])
            valid = torch.tensor([[more_a], [more_b]])
            pos = cache.mask.sum(1, keepdim=True)
            q = scorer(toks, positions=pos, valid=valid, cache=cache).queries
            if more_a:
                qa.append(q[:1])
                ia += 1
            if more_b:
                qb.append(q[1:])
                ib += 1
        inc_a, inc_b = scorer.values(torch.cat(qa, 1)), scorer.values(torch.cat(qb, 1))
    assert (inc_a - full_a).abs().max() < 1e-4
    assert (inc_b - full_b).abs().max() < 1e-4


def test_values_at_matches_full_vocabulary(smol):
    model, tok = smol
    scorer = init_from_base(model, tok, DEFAULT_HEADS, num_layers=2)
    ids = torch.tensor([tok("Hello there", add_special_tokens=False).input_ids])
    with torch.no_grad():
        q = scorer(ids).queries[:, -1]  # (1, H, d_e)
        full = scorer.values(q)  # (1, H, V)
        cands = torch.tensor([[5, 17, 3000]])
        assert torch.allclose(scorer.values_at(q, cands), full[:, :, [5, 17, 3000]], atol=1e-5)


def test_checkpoint_round_trip(smol, tmp_path):
    model, tok = smol
    scorer = init_from_base(model, tok, DEFAULT_HEADS, num_layers=2, seed=3)
    scorer.norm_mean = torch.tensor([[0.1, 0.2]] * 4)
    scorer.norm_std = torch.tensor([[2.0, 3.0]] * 4)
    save_scorer(scorer, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert [h["name"] for h in cfg["heads"]] == ["positive", "specific", "concise", "readable"]
    assert cfg["embedding"]["source"] == "base" and cfg["embedding"]["fingerprint"].startswith("sha256:")
    assert cfg["tokenizer"]["fingerprint"].startswith("sha256:")
    assert cfg["normalization"]["std"][0] == [2.0, 3.0]
    loaded = load_scorer(tmp_path, tok, model.get_input_embeddings().weight)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded.score(ids), scorer.score(ids))
    assert torch.equal(loaded.norm_std, scorer.norm_std)


def test_tokenizer_mismatch_is_refused_naming_both(smol, tmp_path, tiny_model_dir):
    model, tok = smol
    save_scorer(init_from_base(model, tok, DEFAULT_HEADS, num_layers=1), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tokenizer"]["fingerprint"] = "sha256:0000"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FingerprintMismatch) as e:
        load_scorer(tmp_path, tok, model.get_input_embeddings().weight, base_name="SmolLM2")
    msg = str(e.value)
    assert "sha256:0000" in msg and "SmolLM2" in msg
    from prefix_scorers.fingerprint import tokenizer_fingerprint
    assert tokenizer_fingerprint(tok) in msg


def test_embedding_mismatch_is_refused(smol, tmp_path, tiny_model_dir):
    """A scorer that reuses SmolLM2's embedding cannot be loaded onto another base model."""
    model, tok = smol
    save_scorer(init_from_base(model, tok, DEFAULT_HEADS, num_layers=1), tmp_path)
    other = load_model(tiny_model_dir).get_input_embeddings().weight
    with pytest.raises((FingerprintMismatch, ValueError)):
        load_scorer(tmp_path, tok, other)


def test_standalone_scorer_with_own_embedding(smol, tmp_path):
    _, tok = smol
    scorer = random_scorer(len(tok), tok, DEFAULT_HEADS[:2], hidden_size=32)
    save_scorer(scorer, tmp_path)
    loaded = load_scorer(tmp_path, tok)  # no base embedding needed
    ids = torch.tensor([[10, 20, 30]])
    with torch.no_grad():
        assert loaded.score(ids).shape == (1, 3, 2, len(tok))
        assert torch.equal(loaded.score(ids), scorer.score(ids))


def test_combined_values_mix_heads_before_the_vocabulary(smol):
    """combined_values equals sum_h w_h (Q_h - mean_h) / std_h computed head by head."""
    model, tok = smol
    scorer = init_from_base(model, tok, DEFAULT_HEADS, num_layers=1, seed=2)
    ids = torch.tensor([tok("Nice to meet you", add_special_tokens=False).input_ids])
    with torch.no_grad():
        q = scorer(ids).queries[:, -1]  # (1, H, d_e)
        w, mean, std = torch.tensor([[1.0, -0.5, 2.0, 0.0]]), torch.tensor([[0.1, 0.2, -0.3, 0.0]]), \
            torch.tensor([[2.0, 0.5, 1.0, 3.0]])
        want = ((scorer.values(q) - mean[..., None]) / std[..., None] * w[..., None]).sum(1)
        assert torch.allclose(scorer.combined_values(q, mean, std, w), want, atol=1e-4)


def test_last_only_gives_the_last_tokens_queries_and_the_same_cache():
    """A prefill that needs only the last token's queries (the vLLM worker's) skips the head
    projections elsewhere; the queries there and the cache it leaves are those of a full pass."""

    class Tok:
        def get_vocab(self):
            return {f"t{i}": i for i in range(50)}

    scorer = random_scorer(50, Tok(), DEFAULT_HEADS[:2], hidden_size=32, num_layers=2, seed=1)
    ids = torch.randint(50, (2, 7), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    full_cache, last_cache = KVCache.empty(2), KVCache.empty(2)
    with torch.no_grad():
        full = scorer(ids, valid=valid, cache=full_cache).queries
        last = scorer(ids, valid=valid, cache=last_cache, last_only=True).queries
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], full[:, -1])
    for a, b in zip(full_cache.keys + full_cache.values, last_cache.keys + last_cache.values):
        assert torch.equal(a, b)
