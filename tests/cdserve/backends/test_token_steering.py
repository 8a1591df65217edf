"""token_steering.steer_in_place, the token-mode step both engines run, against the
whole-vocabulary definition (steer_rows, then sampled_kl on the (N, V) steered rows): top-k rows
(sampled, greedy, top-p truncated, unused ranks, strength 0) and whole-vocabulary rows in one
batch, with and without an ensemble's risk; rows not named are left as they were."""

from __future__ import annotations

import pytest
import torch

from cdserve.backends.token_steering import TokenRows, steer_in_place, steer_rows
from cdserve.control.steering import sampled_kl
from prefix_scorers.checkpoint import DEFAULT_HEADS, random_scorer
from prefix_scorers.config import EnsembleSpec

V = 64


#            top_k temperature top_p strength risk
SETTINGS = [(5, 0.7, 1.0, 2.0, 0.0),
            (3, 0.0, 1.0, 2.0, 0.5),  # greedy: a point mass, 0 or inf
            (8, 1.0, 0.5, 1.5, -1.0),  # top-p truncates the steered top-k
            (0, 0.7, 1.0, 2.0, 0.0),  # the whole vocabulary
            (0, 1.3, 0.8, 1.0, 1.0),
            (5, 0.9, 1.0, 0.0, 0.0),  # strength 0: the base top-k
            (0, 0.0, 1.0, 3.0, 0.0)]


@pytest.mark.parametrize("ensemble", [1, 3])
def test_steer_in_place_equals_the_whole_vocabulary_steering_and_its_kl(ensemble):
    spec = EnsembleSpec(size=ensemble, method="random") if ensemble > 1 else None
    scorer = random_scorer(V, None, DEFAULT_HEADS[:2], hidden_size=32, num_layers=1, seed=0, ensemble=spec)
    g = torch.Generator().manual_seed(2)
    B = len(SETTINGS) + 2
    logits = torch.randn(B, V, generator=g) * 3
    index = [7, 0, 3, 1, 8, 5, 2]  # rows 4 and 6 are not token rows
    queries = torch.randn(len(index), 2 * ensemble, 32, generator=g)
    top_k, temperature, top_p, strength, risk = (list(c) for c in zip(*SETTINGS))
    weights = [(1.0, -0.5), (0.3, 2.0), (1.0, 1.0), (-1.0, 0.5), (2.0, 0.0), (1.0, 1.0), (0.5, 0.5)]
    positions = [0, 3, 7, 1, 40, 2, 5]
    rows = TokenRows(index, queries, weights, strength, top_k, risk, positions, temperature, top_p)

    base = logits[index]
    expected = steer_rows(scorer, base, queries, torch.tensor(weights), torch.tensor(strength), top_k,
                          torch.tensor(positions), risk)
    expected_kl = sampled_kl(expected, base, torch.tensor(temperature), torch.tensor(top_p))
    out = logits.clone()
    kl = steer_in_place(scorer, out, rows)

    torch.testing.assert_close(out[index], expected, atol=1e-5, rtol=1e-5)
    others = [i for i in range(B) if i not in index]
    assert torch.equal(out[others], logits[others])
    assert torch.isinf(kl).tolist() == torch.isinf(expected_kl).tolist()
    assert kl[[0, 2, 3, 4]].gt(1e-3).all()  # steered rows move away from the base
    torch.testing.assert_close(kl, expected_kl, atol=1e-5, rtol=1e-4)
    # strength 0 at top_p 1: the KL of top-k truncation alone, -log (base mass of the top 5)
    p = torch.softmax(base[5] / 0.9, -1)
    assert float(kl[5]) == pytest.approx(-float(p.topk(5).values.sum().log()), rel=1e-4)


def test_rows_that_keep_their_tail_steer_the_top_k_and_keep_every_other_token_in_its_base_proportions():
    """control.tail "keep": the top-k steered as before, the rest kept in their base proportions,
    valued at the top-k's base-weighted mean value (top-p truncating the whole row), KL over the
    whole vocabulary; strength 0 is plain decoding."""
    scorer = random_scorer(V, None, DEFAULT_HEADS[:2], hidden_size=32, num_layers=1, seed=0)
    g = torch.Generator().manual_seed(3)
    #            top_k temperature top_p strength keep_tail
    settings = [(5, 0.7, 1.0, 2.0, True),
                (5, 0.7, 1.0, 2.0, False),  # the same row, tail dropped
                (8, 1.0, 0.5, 1.5, True),  # top-p over the steered top 8 and the tail
                (3, 0.0, 1.0, 2.0, True),  # greedy
                (5, 0.9, 1.0, 0.0, True),  # strength 0: plain decoding, KL 0
                (0, 0.7, 1.0, 2.0, True)]  # the whole vocabulary has no tail
    logits = torch.randn(len(settings), V, generator=g) * 3
    logits[1] = logits[0]
    index = list(range(len(settings)))
    queries = torch.randn(len(index), 2, 32, generator=g)
    queries[1] = queries[0]
    top_k, temperature, top_p, strength, keep_tail = (list(c) for c in zip(*settings))
    weights = [(1.0, -0.5)] * len(index)
    positions = [3] * len(index)
    rows = TokenRows(index, queries, weights, strength, top_k, [0.0] * len(index), positions, temperature,
                     top_p, keep_tail)

    expected = steer_rows(scorer, logits, queries, torch.tensor(weights), torch.tensor(strength), top_k,
                          torch.tensor(positions), None, keep_tail)
    out = logits.clone()
    kl = steer_in_place(scorer, out, rows)

    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(kl, sampled_kl(expected, logits, torch.tensor(temperature), torch.tensor(top_p)))
    top5 = logits[0].topk(5).indices
    tail = torch.ones(V, dtype=torch.bool)
    tail[top5] = False
    # the tail is shifted by strength x the top 5's values averaged under the base distribution
    mean, std = scorer.norm_stats(torch.tensor([3]))
    with torch.no_grad():
        raw = scorer.values_at(queries[:1], top5[None])  # (1, H, 5)
    values = ((raw[0] - mean[0][:, None]) / std[0][:, None] * torch.tensor([1.0, -0.5])[:, None]).sum(0)
    shift = 2.0 * float((torch.softmax(logits[0, top5], -1) * values).sum())
    torch.testing.assert_close(out[0, tail], logits[0, tail] + shift)
    assert torch.isinf(out[1, tail]).all()  # dropped: -inf
    torch.testing.assert_close(out[0, top5], out[1, top5])  # the top 5 steered alike
    assert 0 < float(kl[0]) < float(kl[1])  # the dropped tail's mass is KL the kept tail does not pay
    torch.testing.assert_close(out[4], logits[4])
    assert float(kl[4]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("index", [[0, 1, 2, 3], [3, 0, 2, 5]])  # a run of the batch (its rows written in place), or not
def test_kept_tail_rows_closed_form_kl_equals_the_whole_vocabulary_kl(index):
    """Sampled rows that keep their tail take the top-k path: the tail shifted by one value, the KL
    in closed form (steering._kept_tail_kl); unused ranks (top_k 3 beside 8) included."""
    scorer = random_scorer(V, None, DEFAULT_HEADS[:2], hidden_size=32, num_layers=1, seed=1)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, V, generator=g) * 3
    queries = torch.randn(4, 2, 32, generator=g)
    top_k, temperature, strength = [3, 8, 5, 8], [0.7, 1.0, 1.3, 0.5], [2.0, 1.0, 4.0, 0.5]
    weights, positions = [(1.0, -0.5), (0.3, 2.0), (-1.0, 0.5), (2.0, 0.0)], [0, 3, 7, 40]
    rows = TokenRows(index, queries, weights, strength, top_k, [0.0] * 4, positions, temperature, [1.0] * 4,
                     [True] * 4)
    base = logits[index]
    expected = steer_rows(scorer, base, queries, torch.tensor(weights), torch.tensor(strength), top_k,
                          torch.tensor(positions), None, [True] * 4)
    out = logits.clone()
    kl = steer_in_place(scorer, out, rows)
    torch.testing.assert_close(out[index], expected, atol=1e-5, rtol=1e-5)
    others = [i for i in range(6) if i not in index]
    assert torch.equal(out[others], logits[others])
    torch.testing.assert_close(kl, sampled_kl(expected, base, torch.tensor(temperature), torch.ones(4)),
                               atol=1e-5, rtol=1e-4)
    assert kl.gt(1e-3).all()


def test_plausibility_holds_rare_tokens_alike_on_every_path_and_zero_changes_nothing():
    """control.plausibility on top-k rows (tail dropped or kept, the kept tail in closed form) and
    whole-vocabulary rows: steer_in_place equals steer_rows, tokens under the floor end no higher
    than the base-expected value lets them, and plausibility 0 is the unheld steering."""
    scorer = random_scorer(V, None, DEFAULT_HEADS[:2], hidden_size=32, num_layers=1, seed=5)
    g = torch.Generator().manual_seed(6)
    #            top_k temperature top_p strength keep_tail plausibility
    settings = [(20, 0.7, 1.0, 4.0, False, 0.1),
                (20, 0.7, 1.0, 4.0, True, 0.1),  # kept tail: the top-k path, KL in closed form
                (0, 0.7, 1.0, 4.0, False, 0.1),  # the whole vocabulary
                (20, 0.7, 1.0, 4.0, False, 0.0)]  # row 0 unheld
    logits = torch.randn(len(settings), V, generator=g) * 3
    logits[1:] = logits[0]
    index = list(range(len(settings)))
    queries = torch.randn(1, 2, 32, generator=g).expand(len(settings), -1, -1).contiguous()
    top_k, temperature, top_p, strength, keep_tail, plausibility = (list(c) for c in zip(*settings))
    weights, positions = [(1.0, -0.5)] * len(index), [3] * len(index)
    rows = TokenRows(index, queries, weights, strength, top_k, [0.0] * len(index), positions, temperature, top_p,
                     keep_tail, plausibility)
    expected = steer_rows(scorer, logits, queries, torch.tensor(weights), torch.tensor(strength), top_k,
                          torch.tensor(positions), None, keep_tail, plausibility)
    out = logits.clone()
    kl = steer_in_place(scorer, out, rows)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl, sampled_kl(expected, logits, torch.tensor(temperature), torch.tensor(top_p)),
                               atol=1e-5, rtol=1e-4)

    rare = torch.softmax(logits[0], -1) < 0.1 * torch.softmax(logits[0], -1).max()
    top20 = torch.zeros(V, dtype=torch.bool)
    top20[logits[0].topk(20).indices] = True
    raised = (out[3] - logits[3]) > (out[0] - logits[0]) + 1e-5  # where the hold cut a value
    assert raised[rare & top20].any() and not raised[~rare].any()
    unheld = TokenRows(index, queries, weights, strength, top_k, [0.0] * len(index), positions, temperature, top_p,
                       keep_tail, [0.0] * len(index))
    torch.testing.assert_close(steer_in_place(scorer, logits.clone(), unheld),
                               steer_in_place(scorer, logits.clone(), TokenRows(
                                   index, queries, weights, strength, top_k, [0.0] * len(index), positions,
                                   temperature, top_p, keep_tail)))

    # the model's end-of-sequence ids are never held: ending an answer spells no word
    eos = int(torch.nonzero(raised & rare & top20)[0])
    rows_eos = TokenRows(index, queries, weights, strength, top_k, [0.0] * len(index), positions, temperature,
                         top_p, keep_tail, plausibility, unheld=(eos,))
    out_eos = logits.clone()
    steer_in_place(scorer, out_eos, rows_eos)
    torch.testing.assert_close(out_eos, steer_rows(scorer, logits, queries, torch.tensor(weights),
                                                   torch.tensor(strength), top_k, torch.tensor(positions), None,
                                                   keep_tail, plausibility, (eos,)), atol=1e-5, rtol=1e-5)
    for j in (0, 2):  # top-k and whole-vocabulary rows: eos steered as unheld
        assert float(out_eos[j, eos] - logits[j, eos]) == pytest.approx(float(out[3, eos] - logits[3, eos]), abs=1e-4)
