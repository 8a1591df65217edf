"""Token-mode steering's pieces alone (cdserve/control/steering.py), on numbers worked out by hand:
which tokens are candidates, where the steered logits land in the vocabulary, the combined value
of the heads, top-p truncation and candidate selection. (The KL term: test_steering_kl.py; host
syncs: test_steering_syncs.py; ensembles and risk: test_risk.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from cdserve.control.steering import (
    apply_top_p,
    combine_heads,
    hold_implausible,
    select_candidate,
    steer_full,
    steer_top_k,
    top_k_candidates,
    top_k_indices,
)

INF = float("inf")


def test_candidates_are_each_rows_top_tokens_best_first_unused_ranks_minus_one():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5],
                           [5.0, 0.0, 1.0, 2.0, 3.0]])
    cands = top_k_candidates(logits, torch.tensor([3, 1]), k_max=3)
    assert cands.tolist() == [[1, 4, 2], [0, -1, -1]]
    assert top_k_candidates(logits, torch.tensor([3, 1])).tolist() == cands.tolist()  # k_max read from top_k


def test_a_top_k_over_the_vocabulary_keeps_every_token():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]])  # 5 tokens, top_k 100 (the server default)
    cands = top_k_candidates(logits, torch.tensor([100]), k_max=100)
    assert cands.tolist() == [[1, 4, 2, 0, 3]]
    steered = steer_top_k(logits, cands, torch.zeros(1, 5), torch.tensor([1.0]))
    assert torch.equal(steered, logits)


def test_steering_adds_strength_times_value_at_each_candidates_vocabulary_position():
    # row 0: candidates 3 and 1 (a third rank unused, its value 9.0 must not leak anywhere):
    #   token 3: 3.0 + 2 * 0.5 = 4.0; token 1: 2.0 + 2 * (-1.0) = 0.0; the rest -inf.
    # row 1: strength 0 keeps the base logits of its candidates 2, 0, 3.
    logits = torch.tensor([[1.0, 2.0, 0.5, 3.0],
                           [0.0, 1.0, 2.0, 3.0]])
    cands = torch.tensor([[3, 1, -1], [2, 0, 3]])
    combined = torch.tensor([[0.5, -1.0, 9.0], [5.0, 5.0, 5.0]])
    steered = steer_top_k(logits, cands, combined, torch.tensor([2.0, 0.0]))
    assert steered.tolist() == [[-INF, 0.0, -INF, 4.0], [0.0, -INF, 2.0, 3.0]]


def test_steering_can_reorder_the_candidates():
    # base prefers token 0 by 1.0; token 1's value is higher by 1.0, so strength 2 flips them
    steered = steer_top_k(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[0, 1]]),
                          torch.tensor([[-0.5, 0.5]]), torch.tensor([2.0]))
    assert steered.tolist() == [[1.0, 2.0, -INF]]


def test_steering_the_whole_vocabulary():
    steered = steer_full(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -0.5]]), torch.tensor([4.0]))
    assert steered.tolist() == [[3.0, 0.0]]


def test_combined_value_normalises_each_head_then_weighs_it():
    # head 0: (v - 1) / 2 -> (0, 1), weight 1; head 1: (v - 1) / 0.5 -> (-2, 2), weight -0.5 -> (1, -1)
    values = torch.tensor([[[1.0, 3.0], [0.0, 2.0]]])  # (N=1, H=2, k=2)
    combined = combine_heads(values, mean=torch.tensor([[1.0, 1.0]]), std=torch.tensor([[2.0, 0.5]]),
                             weights=torch.tensor([[1.0, -0.5]]))
    assert combined.tolist() == [[1.0, 0.0]]


def test_top_p_keeps_the_smallest_set_that_reaches_it_per_row_in_place():
    # probabilities 1/8, 1/2, 1/8, 1/4 at tokens 0..3 (sorted: tokens 1, 3, 0, 2). Mass strictly
    # above each, in that order: 0, 1/2, 3/4, 7/8. top_p 0.7 keeps tokens 1 and 3; 0.8 also token 0
    # (3/4 < 0.8; token 2 has 7/8 above it); 1.0 keeps all. Kept logits are unchanged.
    row = torch.log(torch.tensor([0.125, 0.5, 0.125, 0.25]))
    logits = row.repeat(3, 1)
    out = apply_top_p(logits, torch.tensor([0.7, 0.8, 1.0]))
    kept = torch.isfinite(out)
    assert kept.tolist() == [[False, True, False, True], [True, True, False, True], [True] * 4]
    assert torch.equal(out[kept], logits[kept])
    assert apply_top_p(logits, torch.ones(3), truncate=False) is logits  # no row truncates: untouched


def test_argmax_selection_and_a_single_candidate():
    assert select_candidate(torch.tensor([0.3, 1.2, -0.4]), "argmax", 1.0) == 1
    assert select_candidate(torch.tensor([-5.0]), "sample", 1.0) == 0


def test_sampled_selection_follows_softmax_of_strength_times_value():
    # values (0, ln 3) at strength 1: softmax = (1/4, 3/4); at strength 0: (1/2, 1/2).
    combined = torch.tensor([0.0, math.log(3.0)])
    g = torch.Generator().manual_seed(0)
    draws = 4000
    picked = sum(select_candidate(combined, "sample", 1.0, g) for _ in range(draws)) / draws
    flat = sum(select_candidate(combined, "sample", 0.0, g) for _ in range(draws)) / draws
    # standard error sqrt(p (1 - p) / 4000) < 0.008: within 0.03 is nearly 4 of them
    assert abs(picked - 0.75) < 0.03 and abs(flat - 0.5) < 0.03


def test_top_k_by_chunk_maxima_equals_torch_topk_on_a_whole_vocabulary():
    # 49,152 tokens: the chunked path. Row 0 random; row 1 has its whole top 20 in one chunk (one
    # token per chunk would be wrong); row 2 is -inf but for its last 152 tokens (a bad-words
    # mask: most chunk maxima tie at -inf); row 3 has its top 20 in 20 chunks.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 49152, generator=g)
    logits[1, 5000:5020] = 10.0 + torch.arange(20.0)
    logits[2, :49000] = -INF
    logits[3, torch.arange(20) * 2048 + 7] = 20.0 - torch.arange(20.0)
    for k in (1, 5, 20):
        assert torch.equal(top_k_indices(logits, k), logits.topk(k, dim=-1).indices), k
    odd = torch.randn(2, 1000, generator=g)  # not a whole number of chunks: topk directly
    assert torch.equal(top_k_indices(odd, 7), odd.topk(7, dim=-1).indices)


def test_hold_implausible_keeps_rare_tokens_from_rising_above_a_typical_next_token():
    """control.plausibility: a candidate under plausibility x the top token's base probability keeps
    min(its value, the base-expected value); plausible ones, and every one at plausibility 0, keep theirs."""
    logits = torch.tensor([[2.0, 1.0, -3.0, -6.0, 0.0]])
    cands = torch.tensor([[0, 1, 4, 2, 3]])  # best first; tokens 2 and 3 are under 5% of token 0's probability
    combined = torch.tensor([[0.0, 1.0, -2.0, 3.0, -4.0]])  # token 2 valued highest, token 3 lowest
    expected = float((torch.softmax(logits[0, [0, 1, 4, 2, 3]], -1) * combined[0]).sum())
    held = hold_implausible(logits, cands, combined, torch.tensor([0.05]))
    assert held[0, :3].tolist() == combined[0, :3].tolist()
    assert float(held[0, 3]) == pytest.approx(expected)  # 3.0 cut to the expected value
    assert float(held[0, 4]) == -4.0  # lowering is allowed
    torch.testing.assert_close(hold_implausible(logits, cands, combined, torch.tensor([0.0])), combined)
    # the whole vocabulary (candidates None) agrees with the top-k form when the k are every token
    order = cands[0].argsort()
    full = hold_implausible(logits, None, combined[:, order], torch.tensor([0.05]))
    torch.testing.assert_close(full, held[:, order])
    # the floor is a share of the top token's probability: exp(-3 - 2) = 0.0067 of it
    assert hold_implausible(logits, cands, combined, torch.tensor([0.006]))[0, 3] == 3.0
    # unheld ids (the end-of-sequence tokens) keep their value however rare, on both forms
    unheld = torch.tensor([2])
    assert hold_implausible(logits, cands, combined, torch.tensor([0.05]), unheld)[0, 3] == 3.0
    assert hold_implausible(logits, None, combined[:, order], torch.tensor([0.05]), unheld)[0, 2] == 3.0
