"""The hf sampler alone (cdserve/backends/hf/sampler.py): per-row seeded draws, greedy rows,
top-p, and no value read back from the device when the host passes what it knows."""

from __future__ import annotations

import pytest
import torch
from device_only import device_only, plain

from cdserve.backends.hf.sampler import sample


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampling_reads_nothing_back_from_the_device(top_p):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    temperature, tp = torch.tensor([0.7, 0.0, 1.0]), torch.full((3,), top_p)
    expected = sample(logits, temperature, tp, gens([1, 2, 3]))
    got = sample(device_only(logits), device_only(temperature), device_only(tp), gens([1, 2, 3]),
                 all_greedy=False, truncate=top_p < 1)
    assert torch.equal(plain(got), expected)


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch():
    rng = torch.Generator().manual_seed(0)
    row = torch.randn(1, 100, generator=rng)
    alone = [int(sample(row, torch.tensor([1.0]), torch.ones(1), gens([7]))[0]) for _ in range(1)]
    others = torch.randn(4, 100, generator=rng)
    batch = torch.cat([others[:2], row, others[2:]])
    together = sample(batch, torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0]), torch.ones(5), gens([1, 2, 7, 3, 4]))
    assert int(together[2]) == alone[0]


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    out = sample(logits, torch.tensor([0.0, 5.0, 0.0, 5.0]), torch.ones(4), gens(range(4)))
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_top_p_draws_only_from_the_smallest_set_that_reaches_it():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    drawn = {int(sample(logits, torch.ones(1), torch.tensor([0.7]), gens([s]), all_greedy=False, truncate=True)[0])
             for s in range(200)}
    assert drawn == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it: tokens 2 and 3 are cut


def draw_frequencies(logits_row, temperature: float, rows: int = 4000) -> list[float]:
    """How often each token is drawn: `rows` copies of one row, each with its own seeded generator."""
    logits = logits_row.repeat(rows, 1)
    out = sample(logits, torch.full((rows,), temperature), torch.ones(rows), gens(range(rows)), all_greedy=False)
    return (torch.bincount(out, minlength=logits.shape[1]).float() / rows).tolist()


def test_draws_follow_the_softmax_at_the_requests_temperature():
    # p = (0.6, 0.3, 0.1). At temperature 2 the logits halve: p ~ sqrt(p) = (0.473, 0.334, 0.193).
    # Standard errors at 4000 draws are below 0.008: within 0.025 is more than 3 of them. (Three
    # tokens, not two: with two, the wrong race argmax p * E happens to draw the right p as well.)
    p = torch.tensor([0.6, 0.3, 0.1])
    root = p.sqrt() / p.sqrt().sum()
    for temperature, expected in ((1.0, p), (2.0, root)):
        got = draw_frequencies(torch.log(p), temperature)
        assert all(abs(g - e) < 0.025 for g, e in zip(got, expected.tolist())), (temperature, got)


def test_top_p_applies_to_the_distribution_after_the_temperature():
    # p = (0.6, 0.4): mass above token 1 is 0.6 < 0.65, so top_p 0.65 keeps it at temperature 1.
    # At temperature 0.5, p ~ (0.36, 0.16) = (0.692, 0.308): 0.692 >= 0.65 cuts token 1.
    logits = torch.log(torch.tensor([[0.6, 0.4]]))

    def drawn(temperature):
        return {int(sample(logits, torch.tensor([temperature]), torch.tensor([0.65]), gens([s]),
                           all_greedy=False, truncate=True)[0]) for s in range(100)}

    assert drawn(1.0) == {0, 1}
    assert drawn(0.5) == {0}


def test_a_row_without_a_generator_draws_nothing_and_takes_the_argmax():
    """A row waiting for a selection has no generator: its token is the argmax (and not used),
    and it takes no random numbers from anyone, so its seeded neighbour draws as if alone."""
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.4, 0.3, 0.3]]))
    for seed in range(20):
        alone = sample(logits[1:], torch.ones(1), torch.ones(1), gens([seed]), all_greedy=False)
        both = sample(logits, torch.ones(2), torch.ones(2), [None, torch.Generator().manual_seed(seed)],
                      all_greedy=False)
        assert int(both[0]) == 1 and int(both[1]) == int(alone[0])


def test_an_all_greedy_batch_takes_argmaxes_and_leaves_the_generators_alone():
    logits = torch.tensor([[0.1, 0.9, 0.5], [2.0, -1.0, 1.0]])
    g = gens([5, 6])
    states = [x.get_state() for x in g]
    out = sample(logits, torch.zeros(2), torch.ones(2), g, all_greedy=True)
    assert out.tolist() == [1, 0]
    assert all(torch.equal(x.get_state(), s) for x, s in zip(g, states))
