"""benchmarks/lookahead_signal.py: the one-pass candidate reading is exact, and the ridge readout."""

from __future__ import annotations

import torch

from benchmarks.lookahead_signal import candidate_states, fit_readout, hidden_states, readout
from prefix_scorers.checkpoint import DEFAULT_HEADS, random_scorer

V = 40


def test_each_candidate_is_read_after_its_own_prefix_exactly_as_a_full_pass_would():
    scorer = random_scorer(V, None, DEFAULT_HEADS, hidden_size=16, num_layers=2).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (1, 9), generator=g)
    _, cache = hidden_states(scorer, ids)
    starts = torch.tensor([3, 5, 8])
    cands = torch.randint(1, V, (3, 4), generator=g)
    got = candidate_states(scorer, cache, starts, cands)
    with torch.no_grad():
        for t, start in enumerate(starts.tolist()):
            for j in range(4):
                seq = torch.cat([ids[:, :start], cands[t:t + 1, j:j + 1]], 1)
                want = hidden_states(scorer, seq)[0][-1]
                assert torch.allclose(got[t, j], want, atol=1e-5), (t, j)
    assert cache.keys[0].shape[2] == 9  # the rollout's cache is left as it was


def test_ridge_readout_recovers_a_linear_value():
    g = torch.Generator().manual_seed(1)
    w_true = torch.randn(6, generator=g)
    feats, targets = [], []
    for _ in range(40):  # one target per block, as a rollout's reward is shared by its prefixes
        f = torch.randn(1, 6, generator=g)
        feats.append(f)
        targets.append(float(f[0] @ w_true + 0.5))
    w = fit_readout(feats, targets, ridge=1e-6)
    assert torch.allclose(w[:-1].float(), w_true, atol=1e-3) and abs(float(w[-1]) - 0.5) < 1e-3
    assert torch.allclose(readout(w, feats[0])[0], torch.tensor(targets[0]), atol=1e-3)
