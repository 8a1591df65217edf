"""Block mode's measured KL (benchmarks/quality/block_kl.py): the per-answer sum of per-block
best-of-K KLs against known answers, the block split, and the ranking score against the server's own
scorer code on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.quality.block_kl import BlockSampler, Segment, answer_kl, split_blocks
from cdserve.backends.scorer_runner import ScorerRunner
from prefix_scorers.base_model import load_model, load_tokenizer
from prefix_scorers.checkpoint import load_scorer


@pytest.mark.parametrize("k", [2, 4, 8])
def test_distinct_scores_cost_the_bound_per_block(k):
    pools = [[0.1 * i + b for i in range(16)] for b in range(6)]  # 6 blocks, 16 distinct scores each
    assert answer_kl(pools, k) == pytest.approx(6 * (math.log(k) - (k - 1) / k), abs=1e-9)


def test_tied_blocks_cost_nothing_and_half_ties_by_hand():
    assert answer_kl([[0.3] * 16, [0.0] * 16], 4) == pytest.approx(0.0, abs=1e-12)
    # one block of two atoms (P 1/2 each), K = 2: best-of-2 keeps the top atom with P 3/4
    by_hand = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    distinct = math.log(2) - 1 / 2
    assert answer_kl([[0, 0, 1, 1], [0.0] * 4, [1, 2, 3, 4]], 2) == pytest.approx(by_hand + distinct, abs=1e-9)


def test_split_blocks_replays_the_controller():
    decode = lambda ids: "".join(chr(97 + i % 26) if i != 99 else "." for i in ids)
    eos = {7}
    fixed = Segment("fixed", 3)
    assert split_blocks([1, 2, 3, 4, 5, 6, 8], eos, 48, fixed, decode) == [(0, 3), (3, 6), (6, 7)]
    assert split_blocks([1, 2, 3, 4, 7], eos, 48, fixed, decode) == [(0, 3), (3, 5)]  # EOS ends its block
    assert split_blocks([1, 2, 3, 4, 5], eos, 4, fixed, decode) == [(0, 3), (3, 4), (4, 5)]
    sentence = Segment("sentence", 4)
    assert split_blocks([1, 99, 2, 3, 4, 5, 99], eos, 48, sentence, decode) == [(0, 2), (2, 6), (6, 7)]
    entropy = Segment("entropy", 4, entropy_threshold=1.0)
    ents = [5.0, 0.1, 2.0, 0.1, 0.1, 0.1, 0.1, 3.0]  # before each token; a block takes >= 1 token
    assert split_blocks([1, 2, 3, 4, 5, 6, 8, 9], eos, 48, entropy, decode, ents) == [(0, 2), (2, 6), (6, 7), (7, 8)]


@pytest.fixture(scope="module")
def sampler(tiny_model_dir, tiny_scorer_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    scorer = load_scorer(tiny_scorer_dir, tok, model.get_input_embeddings().weight.detach())
    return BlockSampler(model, tok, scorer, {tok.eos_token_id}, temperature=0.7, top_p=1.0, seed=0)


def test_samples_stop_like_candidates_and_scores_are_the_servers(sampler):
    tok = sampler.tok
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say something nice."}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
    before = tok("Well, I think", add_special_tokens=False)["input_ids"]
    blocks = sampler.sample(prompt + before, 6, 5, Segment("fixed", 5), len(before))
    assert len(blocks) == 6
    for b in blocks:
        assert 1 <= len(b) <= 5 and all(t not in sampler.eos for t in b[:-1])
        assert len(b) == 5 or b[-1] in sampler.eos
    blocks.append([*blocks[0][:2], tok.eos_token_id])  # a block ended by EOS: valued at the EOS
    weights = {"positive": 1.0, "concise": -0.5}
    got = sampler.scores(prompt, before, blocks, weights, {})
    runner = ScorerRunner(sampler.runner.scorer, torch.device("cpu"))
    w = torch.tensor([[weights.get(h, 0.0) for h in sampler.heads]])
    for b, score in zip(blocks, got):  # the server's way: one full pass, then combine at the position
        raw = runner.final_values(prompt, before + b)[None]
        want = float(runner.combine(raw, torch.tensor([len(before) + len(b) - 1]), w)[0])
        assert score == pytest.approx(want, abs=1e-4)
    assert len({round(s, 6) for s in got}) > 1  # the test can tell blocks apart
    # the reward-ranked score: the reward of the answer text so far (EOS dropped), times its weight
    from prefix_scorers.rewards import score_texts

    texts = [sampler.decode(before + [t for t in b if t != tok.eos_token_id]) for b in blocks]
    want = [2.0 * v for v in score_texts(texts, ["concise"])["concise"]]
    assert sampler.scores(prompt, before, blocks, {}, {"concise": 2.0}) == pytest.approx(want)
