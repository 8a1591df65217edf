"""control.risk against hand-computed examples: each head valued at its ensemble's mean + risk *
spread, in token steering (top-k and whole vocabulary) and in block/best_of_n selection, through
the functions both engines call (token_steering.steer_rows, ScorerRunner.combine, select)."""

from __future__ import annotations

import math

import pytest
import torch

from cdserve.backends.scorer_runner import ScorerRunner
from cdserve.backends.token_steering import steer_rows
from cdserve.control.choice import ChoiceController
from cdserve.control.request import ControlConfig, resolve_control
from cdserve.control.steering import ensemble_stats, risk_adjusted
from cdserve.errors import InvalidRequestError
from cdserve.sampling import SamplingParams
from prefix_scorers.checkpoint import DEFAULT_HEADS, random_scorer
from prefix_scorers.config import EnsembleSpec

R2 = math.sqrt(2.0)


@pytest.fixture(scope="module")
def scorer():
    """One head, two members, vocabulary of 4 whose embedding is the identity: a member's value of
    token z is coordinate z of its query (biases 0, normalisation mean 0, std 1)."""
    s = random_scorer(4, None, DEFAULT_HEADS[:1], hidden_size=4, num_layers=1,
                      ensemble=EnsembleSpec(size=2, method="random"))
    with torch.no_grad():
        s.embed.weight.copy_(torch.eye(4))
        s.head_bias.zero_()
    return s


# member 0 values tokens 0..3 at [1, 0, 2, 0], member 1 at [1, 2, 0, 0]:
# mean [1, 1, 1, 0], spread (std, n - 1) [0, sqrt 2, sqrt 2, 0]
QUERIES = torch.tensor([[[1.0, 0.0, 2.0, 0.0], [1.0, 2.0, 0.0, 0.0]]])  # (N=1, H*E=2, d_e=4)


def test_ensemble_stats_and_risk_by_hand():
    members = torch.tensor([[1.0, 3.0, 5.0, 5.0]])  # H=2, E=2: head 0 {1, 3}, head 1 {5, 5}
    mean, spread = ensemble_stats(members, 2)
    torch.testing.assert_close(mean, torch.tensor([[2.0, 5.0]]))
    torch.testing.assert_close(spread, torch.tensor([[R2, 0.0]]))
    torch.testing.assert_close(risk_adjusted(members, 2, torch.tensor([-0.5])), torch.tensor([[2 - R2 / 2, 5.0]]))
    # without an ensemble, risk does nothing
    torch.testing.assert_close(risk_adjusted(members, 1, torch.tensor([1.0])), members)


@pytest.mark.parametrize("risk", [-1.0, 0.0, 0.5])
def test_token_steering_uses_mean_plus_risk_times_spread(scorer, risk):
    base = torch.tensor([[0.3, 0.2, 0.1, 0.0]])
    adjusted = torch.tensor([1.0, 1.0 + risk * R2, 1.0 + risk * R2, 0.0])
    args = (scorer, base, QUERIES, torch.tensor([[1.0]]), torch.tensor([2.0]))
    whole = steer_rows(*args, [0], torch.tensor([0]), [risk])  # top_k 0: every token
    torch.testing.assert_close(whole, base + 2.0 * adjusted[None])
    top2 = steer_rows(*args, [2], torch.tensor([0]), [risk])  # tokens 0 and 1 only
    torch.testing.assert_close(top2[0, :2], base[0, :2] + 2.0 * adjusted[:2])
    assert top2[0, 2:].eq(float("-inf")).all()


def test_rows_with_different_risks_in_one_batch(scorer):
    base = torch.zeros(2, 4)
    out = steer_rows(scorer, base, QUERIES.expand(2, -1, -1), torch.ones(2, 1), torch.ones(2), [0, 0],
                     torch.tensor([0, 0]), [-1.0, 1.0])
    torch.testing.assert_close(out[0], torch.tensor([1.0, 1 - R2, 1 - R2, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([1.0, 1 + R2, 1 + R2, 0.0]))


def _best_of_2(risk: float) -> ChoiceController:
    ctrl = resolve_control({"mode": "best_of_n", "num_candidates": 2, "risk": risk}, ControlConfig(), ["positive"])
    ctl = ChoiceController(0, ctrl, SamplingParams(max_tokens=2), 3, 100, {0}, lambda t: "x" * len(t), 0)
    for k in range(2):
        ctl.push_all(k, [7, 7])
    return ctl


@pytest.mark.parametrize("risk, winner", [(0.0, 1), (-0.5, 0), (0.5, 1)])
def test_selection_by_risk(scorer, risk, winner):
    """Candidate 0: members {1, 1} (value 1, spread 0); candidate 1: members {0, 3} (value 1.5,
    spread 2.12). risk 0 keeps 1 (1.5 > 1); risk -0.5 keeps 0 (1.5 - 1.06 = 0.44 < 1)."""
    runner = ScorerRunner(scorer, torch.device("cpu"))
    raw = torch.tensor([[1.0, 1.0], [0.0, 3.0]])  # (K, H*E)
    ctl = _best_of_2(risk)
    combined = runner.combine(raw, torch.tensor([1, 1]), torch.ones(2, 1), torch.full((2,), risk))
    torch.testing.assert_close(combined, torch.tensor([1.0, 1.5 + risk * 3 / R2]))
    values, spread = runner.head_values(raw)
    assert ctl.select(values, combined, {}, spread) == winner
    reported = ctl.control_values(["positive"])
    assert reported.values == {"positive": pytest.approx([1.0, 1.5][winner])}
    assert reported.spread == {"positive": pytest.approx([0.0, 3 / R2][winner])}
    assert reported.combined == pytest.approx(float(combined[winner]))


@pytest.mark.parametrize("bad", [1.5, -2, float("nan"), float("inf")])
def test_risk_out_of_range_is_refused_naming_it(bad):
    with pytest.raises(InvalidRequestError) as e:
        resolve_control({"mode": "token", "risk": bad}, ControlConfig(), ["positive"])
    assert e.value.param == "control.risk"
    assert "between -1.0 and 1.0" in str(e.value) or "finite" in str(e.value), str(e.value)


def test_risk_defaults_to_the_servers_and_applies_in_every_mode():
    assert resolve_control({"mode": "token"}, ControlConfig(), ["positive"]).risk == 0.0
    assert resolve_control({}, ControlConfig(risk=-0.25), ["positive"]).risk == -0.25
    for mode in ("none", "token", "block", "best_of_n"):
        assert resolve_control({"mode": mode, "risk": 0.5}, ControlConfig(), ["positive"]).risk == 0.5
    with pytest.raises(ValueError):
        ControlConfig(risk=2.0)
