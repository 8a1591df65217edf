"""decode_speed's mode names: token@K sets top_k, token@K:keep keeps the tail too."""

from benchmarks.decode_speed import MODES, mode_control


def test_mode_names_set_top_k_and_the_tail():
    assert mode_control("none") == MODES["none"]
    assert mode_control("token@0") == {**MODES["token"], "top_k": 0}
    assert mode_control("token@100:keep") == {**MODES["token"], "top_k": 100, "tail": "keep"}
    assert mode_control("token@100:drop:0.05") == {**MODES["token"], "top_k": 100, "tail": "drop", "plausibility": 0.05}
