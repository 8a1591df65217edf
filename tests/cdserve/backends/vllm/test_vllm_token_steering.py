"""ScorerLogitsProcessor.apply on a batch of mixed rows, without vLLM's engine: the top-k rows'
in-place steering and candidate-only KL (the 64-stream fast path) give what the reference
whole-vocabulary code gives (token_steering.steer_rows, steering.sampled_kl) from queries
recomputed from scratch; rows without control are left as they were."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")  # the processor implements vllm's logits-processor interface

from cdserve.backends.token_steering import steer_rows
from cdserve.backends.vllm.logits_processor import ScorerLogitsProcessor
from cdserve.backends.vllm.scorer_rows import TokenControl
from cdserve.control.steering import sampled_kl
from prefix_scorers.checkpoint import DEFAULT_HEADS, random_scorer

V = 64


class _Tok:
    def get_vocab(self):
        return {f"t{i}": i for i in range(V)}


def ctrl(key: str, top_k: int, temperature: float, top_p: float = 1.0, strength: float = 2.0,
         keep_tail: bool = False) -> TokenControl:
    return TokenControl(key=key, weights=(1.0, -0.5), strength=strength, top_k=top_k, temperature=temperature,
                        top_p=top_p, keep_tail=keep_tail)


def test_apply_matches_the_whole_vocabulary_reference():
    scorer = random_scorer(V, _Tok(), DEFAULT_HEADS[:2], hidden_size=32, num_layers=2, seed=0)
    proc = ScorerLogitsProcessor.from_scorer(scorer, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    # batch index -> control (None: a request without control); top_k 0 takes the whole-vocabulary path
    controls = {0: ctrl("a", 5, 0.7), 1: None, 2: ctrl("b", 3, 0.0), 3: ctrl("c", 8, 1.0, top_p=0.5),
                4: ctrl("d", 0, 0.7), 5: ctrl("e", 5, 0.0, strength=0.0), 6: None,
                7: ctrl("f", 5, 0.7, keep_tail=True), 8: ctrl("g", 8, 1.0, top_p=0.5, keep_tail=True)}
    seqs = {i: ([int(t) for t in torch.randint(V, (3 + i,), generator=g)], []) for i in controls}
    for i, c in controls.items():
        proc.rows.add(i, c, *seqs[i])
    for step in range(3):
        logits = torch.randn(len(controls), V, generator=g) * 2
        base = logits.clone()
        out = proc.apply(logits)
        for i, c in controls.items():
            if c is None:
                assert torch.equal(out[i], base[i])
                continue
            prompt, output = seqs[i]
            q = scorer(torch.tensor([prompt + output])).queries[:, -1]  # from scratch
            expected = steer_rows(scorer, base[i:i + 1], q, torch.tensor([c.weights]), torch.tensor([c.strength]),
                                  [c.top_k], torch.tensor([len(output)]), keep_tail=[c.keep_tail])
            torch.testing.assert_close(out[i:i + 1], expected, atol=1e-4, rtol=1e-4)
            kl = sampled_kl(expected, base[i:i + 1], torch.tensor([c.temperature]), torch.tensor([c.top_p]))
            row = proc.rows.by_index[i]
            assert len(row.kl) == len(output) + 1
            torch.testing.assert_close(row.kl[-1].reshape(1), kl, atol=1e-5, rtol=1e-4)
        for i, (_, output) in seqs.items():  # the sampled token: the steered argmax
            output.append(int(out[i].argmax()))


def test_the_plausibility_hold_spares_the_requests_unheld_ids_as_the_reference_does():
    """Rows asking for plausibility carry the model's end-of-sequence ids (extra_args "unheld"):
    the processor passes them to the shared step, which never holds them."""
    from cdserve.backends.vllm.scorer_rows import parse_control

    scorer = random_scorer(V, _Tok(), DEFAULT_HEADS[:2], hidden_size=32, num_layers=2, seed=0)
    proc = ScorerLogitsProcessor.from_scorer(scorer, torch.device("cpu"))
    unheld = tuple(range(0, V, 2))  # many ids, so that some are implausible candidates worth raising
    controls = {i: parse_control({"cdserve": {"mode": "token", "weights": [1.0, -0.5], "strength": 4.0, "top_k": k,
                                              "plausibility": 0.9, "unheld": list(unheld), "key": str(i)}}, 2, 0.7)
                for i, k in enumerate((8, 0))}  # top-k and whole-vocabulary paths
    assert controls[0].unheld == unheld
    g = torch.Generator().manual_seed(3)
    seqs = {i: ([int(t) for t in torch.randint(V, (4 + i,), generator=g)], []) for i in controls}
    for i, c in controls.items():
        proc.rows.add(i, c, *seqs[i])
    differs = False
    for _ in range(3):
        logits = torch.randn(len(controls), V, generator=g) * 2
        base = logits.clone()
        out = proc.apply(logits)
        for i, c in controls.items():
            prompt, output = seqs[i]
            q = scorer(torch.tensor([prompt + output])).queries[:, -1]
            args = (scorer, base[i:i + 1], q, torch.tensor([c.weights]), torch.tensor([c.strength]), [c.top_k],
                    torch.tensor([len(output)]))
            expected = steer_rows(*args, plausibility=[c.plausibility], unheld=unheld)
            torch.testing.assert_close(out[i:i + 1], expected, atol=1e-4, rtol=1e-4)
            differs |= not torch.allclose(expected, steer_rows(*args, plausibility=[c.plausibility]), atol=1e-3)
            output.append(int(out[i].argmax()))
    assert differs  # the ids matter here: a processor that dropped them would fail above
