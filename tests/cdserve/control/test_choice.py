"""The per-choice controller both engines drive, with a fake token source: token ids are
characters (id 0 is EOS), so texts and stop strings can be read off the tokens."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cdserve.control.choice import ChoiceController
from cdserve.control.request import ControlConfig, resolve_control
from cdserve.sampling import SamplingParams

EOS = 0
HEADS = ["positive", "concise"]


def ids(s: str) -> list[int]:
    return [ord(ch) for ch in s]


def decode(tokens: list[int]) -> str:
    return "".join(chr(t) for t in tokens if t != EOS)


def controller(control: dict, index: int = 0, prompt_len: int = 5, max_model_len: int = 1000,
               seed: int = 0, **sampling) -> ChoiceController:
    ctrl = resolve_control(control, ControlConfig(), HEADS)
    return ChoiceController(index, ctrl, SamplingParams(**sampling), prompt_len, max_model_len, {EOS},
                            decode, seed)


def select(ctl: ChoiceController, combined: list[float]) -> int:
    raw = torch.tensor([[v, -v] for v in combined])
    return ctl.select(raw, torch.tensor(combined))


def fill(ctl: ChoiceController, blocks: list[str | list[int]]) -> None:
    for k, toks in enumerate(blocks):
        ctl.push_all(k, ids(toks) if isinstance(toks, str) else toks)


def drain(ctl: ChoiceController):
    text, tokens, last = "", [], None
    while (d := ctl.take_delta(HEADS)) is not None:
        text, tokens, last = text + d.text, tokens + d.token_ids, d
    return text, tokens, last


BLOCK = {"mode": "block", "num_candidates": 2, "block_size": 3}


def test_a_losing_candidate_that_hit_eos_does_not_end_the_next_block():
    ctl = controller(BLOCK, max_tokens=12)
    fill(ctl, [ids("a") + [EOS], "bcd"])  # candidate 0 ends by EOS after one token
    assert ctl.waiting and ctl.candidates[0].finish_reason == "stop"
    assert select(ctl, [0.1, 0.9]) == 1 and not ctl.finished
    # The next block starts clean for both rows: a 3-token block each, nothing finished.
    assert all(c.tokens == [] and c.finish_reason is None and not c.done for c in ctl.candidates)
    assert not ctl.push(0, ord("e")) and not ctl.push(0, ord("f")) and ctl.push(0, ord("g"))
    ctl.push_all(1, ids("xyz"))
    select(ctl, [1.0, 0.0])
    assert ctl.text == "bcdefg" and ctl.accepted == ids("bcdefg") and not ctl.finished


def test_the_winner_that_hit_eos_ends_the_answer_and_is_valued_at_the_eos():
    ctl = controller(BLOCK, max_tokens=12)
    fill(ctl, ["abc", "def"])
    select(ctl, [1.0, 0.0])
    fill(ctl, [ids("g") + [EOS], "hij"])
    assert ctl.value_positions() == [4, 5]  # the EOS is the answer's 5th token (index 4)
    select(ctl, [1.0, 0.0])
    assert ctl.finish_reason == "stop" and ctl.text == "abcg" and ctl.accepted == ids("abcg")
    assert ctl.taken() == ids("abcg") + [EOS] and ctl.final_position() == 4
    assert ctl.values == [1.0, -1.0] and ctl.combined == 1.0
    assert ctl.tokens_generated == 6 + 5  # every sampled token, both candidates, EOS included


def test_a_stop_string_that_spans_a_block_boundary_ends_the_answer():
    ctl = controller(BLOCK, max_tokens=12, stop=("XY",))
    fill(ctl, ["abX", "cdX"])  # each block ends with the stop string's first half
    select(ctl, [1.0, 0.0])
    text, _, _ = drain(ctl)
    assert text == "ab"  # "X" is held back: it may start the stop string
    fill(ctl, ["Yzz", "qrs"])  # candidate 0 completes "XY" at its first token: the rest is dropped
    assert ctl.candidates[0].tokens == ids("Y") and ctl.candidates[0].finish_reason == "stop"
    select(ctl, [1.0, 0.0])
    assert ctl.finish_reason == "stop" and ctl.text == "ab"
    text, _tokens, last = drain(ctl)
    assert text == "" and last.finish_reason == "stop" and last.control.selections == 2


def test_max_tokens_inside_a_block_ends_it_early():
    ctl = controller(BLOCK, max_tokens=4)
    assert ctl.block_len == 3
    fill(ctl, ["abc", "def"])
    select(ctl, [0.0, 1.0])
    assert ctl.block_len == 1
    assert ctl.push(0, ord("g")) and ctl.candidates[0].finish_reason == "length"
    ctl.push(1, ord("h"))
    select(ctl, [0.0, 1.0])
    assert ctl.finish_reason == "length" and ctl.text == "defh"


def test_the_context_limit_is_a_length_finish():
    ctl = controller({"mode": "token"}, prompt_len=8, max_model_len=10, max_tokens=100)
    assert ctl.budget == 2
    ctl.push(0, ord("a"))
    assert ctl.push(0, ord("b")) and ctl.finish_reason == "length"


def test_best_of_n_is_one_block_as_long_as_the_answer():
    ctl = controller({"mode": "best_of_n", "num_candidates": 3}, max_tokens=5)
    assert ctl.block_len == 5
    fill(ctl, ["abcde", ids("ab") + [EOS], "vwxyz"])
    assert [c.finish_reason for c in ctl.candidates] == ["length", "stop", "length"]
    select(ctl, [0.0, 2.0, 1.0])
    assert ctl.finish_reason == "stop" and ctl.text == "ab"
    assert ctl.kl == pytest.approx(math.log(3) - 2 / 3)


def test_streaming_modes_accept_every_token_and_hold_back_stop_prefixes():
    ctl = controller({"mode": "token"}, max_tokens=10, stop=("END",))
    ctl.push(0, ord("h"), kl=0.25)
    ctl.push(0, ord("i"), kl=0.5)
    ctl.push(0, ord("E"))
    assert drain(ctl)[0] == "hi"  # "E" could start "END"
    ctl.push(0, ord("x"))
    assert drain(ctl)[0] == "Ex"
    ctl.push(0, ord("E"))
    ctl.push(0, ord("N"))
    assert ctl.push(0, ord("D")) and ctl.finish_reason == "stop"
    text, _tokens, last = drain(ctl)
    assert text == "" and last.control.kl == 0.75 and last.control.tokens_generated == 7
    assert ctl.take_delta(HEADS) is None  # the finish is sent once


def test_n_choices_are_independent_and_sample_selection_follows_softmax():
    # Two choices of one request select with generators of their own (seeded by index).
    a = controller({"mode": "best_of_n", "num_candidates": 2, "selection": "sample", "strength": 1.0}, index=0)
    b = controller({"mode": "best_of_n", "num_candidates": 2, "selection": "sample", "strength": 1.0}, index=1)
    assert not torch.equal(a.generator.get_state(), b.generator.get_state())
    # sample: P(winner = 1) = softmax(strength * (0, log 3))[1] = 3/4
    wins = 0
    for seed in range(2000):
        ctl = controller({"mode": "best_of_n", "num_candidates": 2, "selection": "sample", "strength": 1.0},
                         seed=seed, max_tokens=1)
        fill(ctl, ["a", "b"])
        wins += select(ctl, [0.0, math.log(3)])
    assert wins / 2000 == pytest.approx(0.75, abs=0.03)


def test_argmax_selection_and_abort():
    ctl = controller(BLOCK, max_tokens=12)
    fill(ctl, ["abc", "def"])
    assert select(ctl, [-1.0, -0.5]) == 1
    with pytest.raises(ValueError, match="before all 2 candidates"):
        select(ctl, [0.0, 0.0])
    ctl.abort()
    assert ctl.finish_reason == "abort"
    assert drain(ctl)[2].finish_reason == "abort"


SENTENCE = {"mode": "block", "num_candidates": 2, "block_size": 6, "segment": "sentence"}


def test_sentence_segments_end_candidates_at_different_lengths():
    ctl = controller(SENTENCE, max_tokens=40)
    assert ctl.push_all(0, ids("Hi. You")) == ids("Hi.")  # ends after the first sentence end
    assert ctl.push_all(1, ids("abcdefgh")) == ids("abcdef")  # no end: block_size is the guard
    assert ctl.value_positions() == [2, 5]
    select(ctl, [1.0, 0.0])
    assert ctl.text == "Hi." and ctl.selections == 1
    # The next segment looks only at its own text: the "." already accepted does not end it.
    assert not ctl.push(0, ord(" ")) and not ctl.push(0, ord("Y")) and ctl.push(0, ord("!"))
    assert ctl.push_all(1, ids("\nx")) == ids("\n")
    select(ctl, [0.0, 1.0])
    assert ctl.text == "Hi.\n"


def test_fixed_segments_ignore_sentence_ends():
    ctl = controller(BLOCK, max_tokens=40)
    assert ctl.push_all(0, ids("a. b")) == ids("a. ")


def test_rewards_mix_with_the_scorer_value_in_selection():
    ctl = controller({"mode": "best_of_n", "num_candidates": 3, "weights": {"positive": 1.0}}, max_tokens=4)
    ctl.control = dataclasses.replace(ctl.control, rewards=(("concise", 2.0), ("len", -1.0)))
    fill(ctl, ["abcd", ids("ab") + [EOS], "wxyz"])
    assert ctl.reward_texts() == ["abcd", "ab", "wxyz"]
    # values: scorer combined + 2 * concise - len
    w = ctl.select(torch.zeros(3, 2), torch.tensor([0.0, 0.1, 1.0]),
                   {"concise": [0.2, 0.9, 0.1], "len": [4, 2, 4]})
    assert w == 1  # 0.1 + 1.8 - 2 = -0.1 beats 0 + 0.4 - 4 and 1 + 0.2 - 4
    assert ctl.control_values(HEADS).rewards == {"concise": 0.9, "len": 2.0}
    assert ctl.combined == pytest.approx(0.1)  # the scorer's combined value, as without rewards


PRUNED = {"mode": "best_of_n", "num_candidates": 4, "prune_every": 2, "keep_fraction": 0.5}


def test_pruned_best_of_n_keeps_the_best_half_then_streams_the_last_survivor():
    ctl = controller(PRUNED, max_tokens=8)
    assert ctl.block_len == 2
    fill(ctl, ["ab", "cd", "ef", "gh"])
    assert ctl.waiting and ctl.select(torch.zeros(4, 2), torch.tensor([0.1, 0.9, 0.5, 0.2])) == -1
    assert ctl.alive == [1, 2] and ctl.selections == 1 and not ctl.finished and ctl.text == ""
    assert ctl.block_len == 2 and not ctl.waiting
    assert ctl.push_all(1, ids("ij")) == ids("cdij") and ctl.push_all(2, ids("kl")) == ids("efkl")
    assert ctl.value_positions()[1:3] == [3, 3]
    assert ctl.select(torch.zeros(4, 2), torch.tensor([9.0, 0.1, 0.3, 9.0])) == -1  # pruned ones cannot win
    assert ctl.alive == [2] and ctl.streaming and ctl.text == "efkl"
    assert drain(ctl)[0] == "efkl"  # one survivor: it streams from now on
    ctl.push(2, ord("m"))
    assert drain(ctl)[0] == "m"
    ctl.push(2, ord("n"))
    ctl.push(2, ord("o"))
    assert ctl.push(2, ord("p")) and ctl.finish_reason == "length" and ctl.text == "efklmnop"
    assert ctl.tokens_generated == 8 + 4 + 4  # all four to 2 tokens, two to 4, the survivor to 8
    assert ctl.kl == pytest.approx(math.log(4))


def test_pruned_best_of_n_where_candidates_finish_between_pruning_points():
    ctl = controller({**PRUNED, "keep_fraction": 0.75}, max_tokens=8)
    fill(ctl, [ids("a") + [EOS], "cd", "ef", "gh"])  # candidate 0 ends early and waits
    assert ctl.select(torch.zeros(4, 2), torch.tensor([5.0, 0.1, 0.5, 0.2])) == -1
    assert ctl.alive == [0, 2, 3] and ctl.candidates[0].done and not ctl.candidates[2].done
    ctl.push_all(2, ids("k") + [EOS])
    ctl.push_all(3, ids("m") + [EOS])
    # all survivors finished: the final selection among them
    assert ctl.select(torch.zeros(4, 2), torch.tensor([0.0, 9.0, 0.2, 0.1])) == 2
    assert ctl.finish_reason == "stop" and ctl.text == "efk" and ctl.selections == 2


ENTROPY = {"mode": "block", "num_candidates": 3, "block_size": 4, "segment": "entropy", "entropy_threshold": 1.0}


def uniform_logits(n: int, vocab: int = 16) -> torch.Tensor:
    """Next-token logits of entropy log(n) nats: n equally likely tokens."""
    return torch.full((vocab,), float("-inf")).index_fill(0, torch.arange(n), 0.0)


def test_entropy_segments_end_candidates_before_their_first_uncertain_token():
    """The engines' step: segments.entropy_ends on each candidate's next-token logits, then
    end_block (the token is not taken) or push. Entropies log 1 = 0 and log 2 = 0.69 stay under the
    threshold 1.0 nats, log 3 = 1.10 is over it."""
    from cdserve.control.segments import entropy_ends

    ctl = controller(ENTROPY, max_tokens=40)
    # Per candidate, the number of equally likely next tokens at each of its steps.
    support = [[3, 1, 3, 1], [1, 2, 1, 1, 1], [3, 3, 3, 3, 3]]
    letters = iter("abcdefghijklmnop")
    step = 0
    while not ctl.waiting:
        live = [k for k in range(ctl.K) if not ctl.candidates[k].done]
        logits = torch.stack([uniform_logits(support[k][step]) for k in live])
        taken = torch.tensor([len(ctl.candidates[k].tokens) for k in live])
        ends = entropy_ends(logits, torch.full((len(live),), ctl.control.entropy_threshold), taken)
        for k, end in zip(live, ends.tolist()):
            if end:
                ctl.end_block(k)
            else:
                ctl.push(k, ord(next(letters)))
        step += 1
    # 0: its first token is uncertain but a block takes at least one; it ends before its third.
    # 1: never uncertain: block_size (4) ends it. 2: always uncertain: one token.
    assert [len(c.tokens) for c in ctl.candidates] == [2, 4, 1]
    assert ctl.value_positions() == [1, 3, 0]
    assert select(ctl, [0.0, 0.0, 1.0]) == 2
    assert ctl.tokens_generated == 7 and len(ctl.accepted) == 1 and ctl.selections == 1
    # The next block starts with fresh candidates and again takes its first token whatever it costs.
    assert [c.tokens for c in ctl.candidates] == [[], [], []]
    with pytest.raises(ValueError, match="no tokens"):
        ctl.end_block(0)


def test_entropy_is_computed_at_temperature_one_in_nats():
    from cdserve.control.segments import next_token_entropy

    logits = torch.stack([uniform_logits(4), torch.tensor([0.0, math.log(3.0)] + [float("-inf")] * 14)])
    assert next_token_entropy(logits).tolist() == pytest.approx([math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])


def test_pruning_points_fall_at_segment_ends():
    """Pruned best-of-N with segment sentence: each candidate runs to its next sentence end (at most
    prune_every tokens past its last pruning point), so the candidates meet a point at different
    lengths; survivors go on from where they stopped."""
    ctl = controller({**PRUNED, "prune_every": 6, "segment": "sentence"}, max_tokens=30)
    assert ctl.block_len == 6
    assert ctl.push_all(0, ids("Hi. Yo")) == ids("Hi.")
    assert ctl.push_all(1, ids("abcdefgh")) == ids("abcdef")  # no sentence end: prune_every is the cap
    assert ctl.push_all(2, ids("No!")) == ids("No!")
    assert ctl.push_all(3, ids("x.")) == ids("x.")
    assert ctl.select(torch.zeros(4, 2), torch.tensor([0.9, 0.8, 0.1, 0.0])) == -1
    assert ctl.alive == [0, 1] and [ctl.candidate_len(k) for k in (0, 1)] == [6, 6]
    # The "." already passed does not end candidate 0 again; the next one does.
    assert ctl.push_all(0, ids(" Ok. b")) == ids("Hi. Ok.")
    assert ctl.push_all(1, ids("g?")) == ids("abcdefg?")
    assert ctl.value_positions()[:2] == [6, 7]
    assert ctl.select(torch.zeros(4, 2), torch.tensor([0.0, 1.0, 9.0, 9.0])) == -1
    assert ctl.alive == [1] and ctl.streaming and ctl.text == "abcdefg?"
    assert ctl.tokens_generated == (3 + 2) + 8 + 7  # the pruned ones' tokens, then 0's 7 and 1's 8


def test_pruning_points_at_entropy_ends_come_from_the_engine():
    ctl = controller({**PRUNED, "prune_every": 4, "segment": "entropy"}, max_tokens=30)
    ctl.push_all(0, ids("ab"))
    ctl.end_block(0)  # the engine saw an uncertain next token
    for k in (1, 2, 3):
        assert ctl.push_all(k, ids("cdefg")) == ids("cdef")
    assert ctl.select(torch.zeros(4, 2), torch.tensor([1.0, 0.9, 0.0, 0.0])) == -1
    assert [len(ctl.candidates[k].tokens) for k in ctl.alive] == [2, 4]
    assert [ctl.candidate_len(k) for k in ctl.alive] == [4, 4]
    with pytest.raises(ValueError, match="no tokens"):  # a survivor takes a token before its next end
        ctl.end_block(0)
    ctl.push(0, ord("c"))
    ctl.end_block(0)
    assert ctl.candidates[0].done and ctl.candidates[0].grown == 1
