"""benchmarks/token_reward_probe.py: token mode steered by the true reward of the text so far."""

from __future__ import annotations

import statistics

from benchmarks.token_reward_probe import generate
from cdserve.text import eos_token_ids
from prefix_scorers.base_model import load_model, load_tokenizer
from prefix_scorers.rewards import register_reward

PROMPTS = ["Say something.", "Write a line about the sea.", "Name a colour.", "Hello!"]


def _e_share(texts):
    return [t.count("e") / max(1, len(t)) for t in texts]


def test_steering_by_a_reward_raises_it_and_costs_kl(tiny_model_dir):
    register_reward("e_share", _e_share, replace=True)
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    eos = set(eos_token_ids(tiny_model_dir, tok))

    def run(strength, top_k=20):
        out = generate(model, tok, PROMPTS, strength=strength, reward="e_share", weight=1.0, top_k=top_k,
                       temperature=0.7, max_tokens=12, eos=eos, seed=0)
        return statistics.fmean(_e_share([a["text"] for a in out])), statistics.fmean(a["kl"] for a in out), out

    plain_share, plain_kl, plain = run(0.0, top_k=len(tok))
    steered_share, steered_kl, steered = run(40.0)
    assert abs(plain_kl) < 1e-3  # every token a candidate, no steering: the base distribution
    assert all(1 <= a["tokens"] <= 12 and a["prompt"] in PROMPTS for a in plain + steered)
    assert steered_share > plain_share + 0.05
    assert steered_kl > 1.0
