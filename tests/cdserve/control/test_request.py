"""Every control validation error names its parameter; valid settings resolve as documented."""

import math

import pytest

from cdserve.control.request import ControlConfig, resolve_control
from cdserve.errors import InvalidRequestError
from cdserve.sampling import SamplingParams

HEADS = ["positive", "specific", "concise", "readable"]
CFG = ControlConfig(max_block_size=16, max_num_candidates=8, max_top_k=100)


def resolve(raw):
    return resolve_control(raw, CFG, HEADS)


def test_defaults_fill_omitted_fields():
    c = resolve({"mode": "token"})
    assert (c.mode, c.strength, c.top_k) == ("token", CFG.strength, CFG.top_k)
    assert c.weights == (1.0, 0.0, 0.0, 0.0)  # default: first head
    c = resolve({"mode": "block", "weights": {"concise": 2.0, "positive": -1.0}})
    assert c.weights == (-1.0, 0.0, 2.0, 0.0)
    assert (c.block_size, c.num_candidates, c.selection, c.candidates) == (8, 4, "argmax", 4)
    assert resolve(None).mode == "none" and resolve({}).candidates == 1


@pytest.mark.parametrize("raw, param", [
    ({"mode": "beam"}, "control.mode"),
    ({"mode": "token", "temperature": 1}, "control.temperature"),  # unknown field
    ({"mode": "token", "weights": {"happy": 1.0}}, "control.weights.happy"),
    ({"mode": "token", "weights": {"positive": math.nan}}, "control.weights.positive"),
    ({"mode": "token", "weights": {"positive": math.inf}}, "control.weights.positive"),
    ({"mode": "token", "weights": {"positive": 1e6}}, "control.weights.positive"),
    ({"mode": "token", "weights": {"positive": "a lot"}}, "control.weights.positive"),
    ({"mode": "token", "strength": math.inf}, "control.strength"),
    ({"mode": "token", "strength": -1}, "control.strength"),
    ({"mode": "token", "strength": 1e9}, "control.strength"),
    ({"mode": "token", "top_k": -1}, "control.top_k"),
    ({"mode": "token", "top_k": 101}, "control.top_k"),
    ({"mode": "token", "top_k": 2.5}, "control.top_k"),
    ({"mode": "block", "block_size": 0}, "control.block_size"),
    ({"mode": "block", "block_size": 17}, "control.block_size"),
    ({"mode": "block", "num_candidates": 9}, "control.num_candidates"),
    ({"mode": "best_of_n", "num_candidates": 0}, "control.num_candidates"),
    ({"mode": "block", "selection": "best"}, "control.selection"),
    # fields that make no sense for the mode
    ({"mode": "token", "block_size": 4}, "control.block_size"),
    ({"mode": "token", "num_candidates": 4}, "control.num_candidates"),
    ({"mode": "token", "selection": "sample"}, "control.selection"),
    ({"mode": "block", "top_k": 5}, "control.top_k"),
    ({"mode": "best_of_n", "block_size": 4}, "control.block_size"),
    ({"mode": "none", "strength": 2}, "control.strength"),
    ({"mode": "none", "top_k": 5}, "control.top_k"),
    ({"mode": "token", "tail": "base"}, "control.tail"),
    ({"mode": "block", "tail": "keep"}, "control.tail"),
    ({"mode": "block", "strength": 2}, "control.strength"),  # argmax ignores strength
    ({"mode": "token", "plausibility": 1.0}, "control.plausibility"),
    ({"mode": "token", "plausibility": -0.1}, "control.plausibility"),
    ({"mode": "block", "plausibility": 0.05}, "control.plausibility"),  # token mode's alone
    ("token", "control"),
])
def test_invalid_control_names_the_parameter(raw, param):
    with pytest.raises(InvalidRequestError) as e:
        resolve(raw)
    assert e.value.param == param
    assert e.value.status_code == 400


def test_sample_selection_takes_strength():
    c = resolve({"mode": "block", "selection": "sample", "strength": 3.0})
    assert (c.selection, c.strength) == ("sample", 3.0)


def test_top_k_zero_means_whole_vocabulary():
    assert resolve({"mode": "token", "top_k": 0}).top_k == 0


def test_tail_defaults_to_the_servers_and_reaches_the_engines():
    assert resolve({"mode": "token"}).tail == "drop"
    c = resolve({"mode": "token", "tail": "keep"})
    assert c.tail == "keep" and c.extra_args()["tail"] == "keep"
    assert resolve_control({"mode": "token"}, ControlConfig(tail="keep"), HEADS).tail == "keep"


def test_plausibility_defaults_to_the_servers_and_reaches_the_engines():
    assert resolve({"mode": "token"}).plausibility == 0.0
    c = resolve({"mode": "token", "plausibility": 0.05})
    assert c.plausibility == 0.05 and c.extra_args()["plausibility"] == 0.05
    assert resolve_control({"mode": "token"}, ControlConfig(plausibility=0.1), HEADS).plausibility == 0.1
    with pytest.raises(ValueError, match="plausibility"):
        ControlConfig(plausibility=1.0)


def test_config_checks_limits_and_heads():
    with pytest.raises(ValueError, match="top_k"):
        ControlConfig(top_k=50, max_top_k=10)
    with pytest.raises(ValueError, match="happy"):
        ControlConfig(weights={"happy": 1.0}).check_heads(HEADS)


@pytest.mark.parametrize("params, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 99}, "n"),
    ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
    ({"stop": ("",)}, "stop"),
])
def test_invalid_sampling_names_the_parameter(params, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**params).validate(max_tokens_limit=512, max_n=8)
    assert e.value.param == param


def test_rewards_and_segment_are_validated():
    from cdserve.control.request import ControlConfig, resolve_control
    from cdserve.errors import InvalidRequestError

    heads, rewards = ["positive", "concise"], ["concise", "vader_compound"]
    ok = resolve_control({"mode": "block", "rewards": {"concise": 1.0}, "segment": "sentence", "weights": {}},
                         ControlConfig(), heads, rewards)
    assert ok.rewards == (("concise", 1.0),) and ok.segment == "sentence" and ok.weights == (0.0, 0.0)
    for control, param in (({"mode": "block", "rewards": {"nope": 1.0}}, "control.rewards.nope"),
                           ({"mode": "best_of_n", "rewards": {"concise": float("nan")}}, "control.rewards.concise"),
                           ({"mode": "best_of_n", "rewards": {"concise": 1e9}}, "control.rewards.concise"),
                           ({"mode": "token", "rewards": {"concise": 1.0}}, "control.rewards"),
                           ({"mode": "token", "segment": "sentence"}, "control.segment"),
                           ({"mode": "block", "segment": "paragraph"}, "control.segment")):
        with pytest.raises(InvalidRequestError) as e:
            resolve_control(control, ControlConfig(), heads, rewards)
        assert e.value.param == param, control


def test_pruning_fields_are_validated():
    from cdserve.control.request import ControlConfig, resolve_control
    from cdserve.errors import InvalidRequestError

    heads = ["positive"]
    ok = resolve_control({"mode": "best_of_n", "prune_every": 8, "keep_fraction": 0.25}, ControlConfig(), heads)
    assert (ok.prune_every, ok.keep_fraction) == (8, 0.25)
    for control, param in (({"mode": "block", "prune_every": 4}, "control.prune_every"),
                           ({"mode": "best_of_n", "prune_every": -1}, "control.prune_every"),
                           ({"mode": "best_of_n", "keep_fraction": 0.0}, "control.keep_fraction"),
                           ({"mode": "best_of_n", "keep_fraction": 1.5}, "control.keep_fraction"),
                           ({"mode": "best_of_n", "keep_fraction": float("inf")}, "control.keep_fraction")):
        with pytest.raises(InvalidRequestError) as e:
            resolve_control(control, ControlConfig(), heads)
        assert e.value.param == param, control


def test_entropy_segment_and_its_threshold_are_validated():
    from cdserve.control.request import ControlConfig, resolve_control
    from cdserve.errors import InvalidRequestError

    heads = ["positive"]
    ok = resolve_control({"mode": "block", "segment": "entropy", "entropy_threshold": 1.5}, ControlConfig(), heads)
    assert (ok.segment, ok.entropy_threshold) == ("entropy", 1.5)
    default = resolve_control({"mode": "block", "segment": "entropy"}, ControlConfig(entropy_threshold=2.5), heads)
    assert default.entropy_threshold == 2.5
    for control, param, words in (
            ({"mode": "block", "segment": "entropy", "entropy_threshold": 0.0}, "control.entropy_threshold", "> 0"),
            ({"mode": "block", "segment": "entropy", "entropy_threshold": -1}, "control.entropy_threshold", "> 0"),
            ({"mode": "block", "segment": "entropy", "entropy_threshold": float("nan")},
             "control.entropy_threshold", "finite"),
            ({"mode": "block", "segment": "entropy", "entropy_threshold": "high"}, "control.entropy_threshold",
             "number"),
            ({"mode": "best_of_n", "prune_every": 8, "segment": "entropy", "entropy_threshold": 0},
             "control.entropy_threshold", "> 0"),
            ({"mode": "token", "entropy_threshold": 1.0}, "control.entropy_threshold", "mode 'token'"),
            ({"mode": "token", "segment": "entropy"}, "control.segment", "mode 'token'")):
        with pytest.raises(InvalidRequestError) as e:
            resolve_control(control, ControlConfig(), heads)
        assert e.value.param == param and words in str(e.value), (control, str(e.value))
    with pytest.raises(ValueError, match="entropy_threshold"):
        ControlConfig(entropy_threshold=0)


def test_pruned_best_of_n_takes_segments_as_pruning_points():
    from cdserve.control.request import ControlConfig, resolve_control

    heads = ["positive"]
    ok = resolve_control({"mode": "best_of_n", "prune_every": 16, "segment": "entropy", "entropy_threshold": 2.5},
                         ControlConfig(), heads)
    assert (ok.segment, ok.entropy_threshold, ok.prune_every) == ("entropy", 2.5, 16)
    # The server's default segment is block mode's: best_of_n without one prunes every prune_every tokens.
    plain = resolve_control({"mode": "best_of_n", "prune_every": 16}, ControlConfig(segment="sentence"), heads)
    assert plain.segment == "fixed"
    # Schema-valid settings are accepted (the OpenAPI document cannot tie them to segment / prune_every):
    # a threshold without segment entropy is unused, a best_of_n segment without pruning has no points.
    for control, segment in (({"mode": "block", "entropy_threshold": 1.0}, "fixed"),
                             ({"mode": "block", "segment": "sentence", "entropy_threshold": 1.0}, "sentence"),
                             ({"mode": "best_of_n", "segment": "entropy", "entropy_threshold": 1.0}, "fixed")):
        assert resolve_control(control, ControlConfig(), heads).segment == segment
