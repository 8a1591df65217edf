"""Token-mode steering and the KL term compute on the device without reading values back to the
host when the caller passes what it knows (k_max, whether any row truncates by top-p)."""

from __future__ import annotations

import torch
from device_only import device_only, plain

from cdserve.control.steering import sampled_kl, steer_top_k, top_k_candidates


def test_top_k_steering_with_k_max_from_the_host_reads_nothing_back():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    top_k = torch.tensor([2, 5, 3])
    expected = top_k_candidates(logits, top_k)
    cands = top_k_candidates(device_only(logits), device_only(top_k), 5)
    assert torch.equal(plain(cands), expected)
    steered = steer_top_k(device_only(logits), cands, device_only(torch.ones(3, 5)), device_only(torch.full((3,), 2.0)))
    assert torch.isfinite(plain(steered)).sum(1).tolist() == [2, 5, 3]


def test_the_kl_term_with_the_top_p_hint_reads_nothing_back():
    base = torch.randn(2, 40, generator=torch.Generator().manual_seed(1))
    steered = base + torch.randn(2, 40, generator=torch.Generator().manual_seed(2))
    t, top_p = torch.tensor([0.7, 1.0]), torch.tensor([0.9, 1.0])
    expected = sampled_kl(steered, base, t, top_p)
    got = sampled_kl(*map(device_only, (steered, base, t, top_p)), truncate=True)
    assert torch.allclose(plain(got), expected)
