"""benchmarks/token_signal.py's bootstrap: intervals over prompt resamples, paired by rollout."""

from __future__ import annotations

import torch

from benchmarks.token_signal import bootstrap
from prefix_scorers.token_signal import signal_stats


def _sums(seed: int, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(n, 2, generator=g)
    return (r + 0.3 * torch.randn(n, 2, generator=g), torch.rand(n, 2, generator=g) + 0.1, r)


def test_full_data_efficiency_is_signal_stats_and_a_scorer_against_itself_differs_by_zero():
    a, b = _sums(0), _sums(1)
    prompts = [f"p{i // 3}" for i in range(12)]  # 4 prompts, 3 rollouts each
    draws, full = bootstrap([a, a, b], prompts, rounds=50, seed=0)
    assert draws.shape == (50, 3, 2)
    assert torch.allclose(full[0], signal_stats(*a)["efficiency"])
    assert torch.equal(draws[:, 0], draws[:, 1])  # same rows drawn for every scorer: paired
    assert not torch.equal(draws[:, 0], draws[:, 2])
    assert draws[:, 0].std(0).gt(0).all()  # the resamples differ


def test_missing_held_out_rollouts_name_how_to_make_them(tmp_path):
    import pytest

    from benchmarks.token_signal import held_out

    with pytest.raises(SystemExit, match=r"no rollouts.jsonl \+ labels.jsonl in .*prefix-scorers rollouts"):
        held_out(tmp_path, tmp_path / "prompts.jsonl", [])
