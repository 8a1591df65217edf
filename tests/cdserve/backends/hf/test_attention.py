"""The hf engine's grouped-query decode attention (attention.py) against transformers' sdpa on
the tiny Llama (4 query heads, 2 KV heads): same logits on a left-padded batch's decode steps,
and the engine's model runner switches to it."""

from __future__ import annotations

import torch

from cdserve.backends.hf.attention import NAME, use_grouped_decode_attention
from cdserve.backends.hf.model_runner import ModelRunner
from prefix_scorers.base_model import load_model


def _decode_logits(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill all but the last `steps` columns, then decode those one at a time: logits (steps, B, V)."""
    P = ids.shape[1] - steps
    with torch.inference_mode():
        out = model(input_ids=ids[:, :P], attention_mask=mask[:, :P], use_cache=True)
        cache, logits = out.past_key_values, []
        for t in range(P, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                        use_cache=True)
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits)


def test_grouped_decode_attention_gives_sdpas_logits(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, and a row with a hole (a waiting row's placeholder)
    mask[1, 7] = 0
    model.set_attn_implementation("sdpa")
    expected = _decode_logits(model, ids, mask, 5)
    use_grouped_decode_attention(model)
    assert model.config._attn_implementation == NAME
    got = _decode_logits(model, ids, mask, 5)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_the_model_runner_decodes_with_it(tiny_model_dir):
    runner = ModelRunner(load_model(tiny_model_dir), torch.device("cpu"))
    assert runner.model.config._attn_implementation == NAME
