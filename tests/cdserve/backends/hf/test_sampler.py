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
