"""Token-mode steering and the KL term compute on the device without reading values back to the
host when the caller passes what it knows (k_max, whether any row truncates by top-p)."""

from __future__ import annotations

import torch

from cdserve.control.steering import sampled_kl, steer_top_k, top_k_candidates

HOST_READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero"}


class DeviceOnly(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            raise AssertionError(f"host sync: {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_top_k_steering_with_k_max_from_the_host_reads_nothing_back():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    top_k = torch.tensor([2, 5, 3])
    expected = top_k_candidates(logits, top_k)
    cands = top_k_candidates(logits.as_subclass(DeviceOnly), top_k.as_subclass(DeviceOnly), 5)
    assert torch.equal(cands.as_subclass(torch.Tensor), expected)
    steered = steer_top_k(logits.as_subclass(DeviceOnly), cands, torch.ones(3, 5).as_subclass(DeviceOnly),
                          torch.full((3,), 2.0).as_subclass(DeviceOnly))
    assert torch.isfinite(steered.as_subclass(torch.Tensor)).sum(1).tolist() == [2, 5, 3]


def test_the_kl_term_with_the_top_p_hint_reads_nothing_back():
    base = torch.randn(2, 40, generator=torch.Generator().manual_seed(1))
    steered = base + torch.randn(2, 40, generator=torch.Generator().manual_seed(2))
    t, top_p = torch.tensor([0.7, 1.0]), torch.tensor([0.9, 1.0])
    expected = sampled_kl(steered, base, t, top_p)
    got = sampled_kl(*(x.as_subclass(DeviceOnly) for x in (steered, base, t, top_p)), truncate=True)
    assert torch.allclose(got.as_subclass(torch.Tensor), expected)
