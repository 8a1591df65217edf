"""A tensor whose values may not be read on the host, for tests that the per-token code does not
sync with the device: on a GPU every such read (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`, ...)
waits for the device to finish."""

from __future__ import annotations

import torch

HOST_READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero"}


class DeviceOnly(torch.Tensor):
    """Any host read of its values fails the test, naming the read."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            raise AssertionError(f"host sync: {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})


def device_only(tensor: torch.Tensor) -> DeviceOnly:
    return tensor.as_subclass(DeviceOnly)


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """The values, readable again (to compare them)."""
    return tensor.as_subclass(torch.Tensor)
