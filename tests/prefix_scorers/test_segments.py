"""The segmenter: sentence and clause boundaries on finished and partial text, and token spans
under SmolLM2's real tokenizer (byte-level BPE)."""

from __future__ import annotations

from itertools import pairwise

import pytest

from prefix_scorers.base_model import load_tokenizer
from prefix_scorers.segments import boundaries, segment_response, segment_text


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_sentences_keep_numbers_abbreviations_and_initials_whole():
    text = "I love this. It costs 3.5 dollars, e.g. cheap! Dr. Smith and J. R. R. Tolkien agree... And then"
    assert segment_text(text) == ["I love this.", " It costs 3.5 dollars, e.g. cheap!",
                                  " Dr. Smith and J. R. R. Tolkien agree...", " And then"]


def test_clauses_split_at_commas_semicolons_colons_and_dashes():
    text = "Well, it's great; really — I mean it: \"wow.\" Next"
    assert segment_text(text, "clause") == ["Well,", " it's great;", " really —", " I mean it:", ' "wow."', " Next"]


def test_line_breaks_and_list_numbers():
    text = "Steps:\n1. Mix the flour\n2. Bake it\n\nDone. It costs 2. Then"
    assert segment_text(text) == ["Steps:\n", "1. Mix the flour\n", "2. Bake it\n\n", "Done.", " It costs 2.", " Then"]


@pytest.mark.parametrize("text", ["", "hello world this is text with no punctuation at all",
                                  "A partial sentence cut at", "Ends with a dot."])
def test_text_without_an_inner_boundary_is_one_segment(text):
    assert boundaries(text) == [] and boundaries(text, "clause") == []
    assert segment_text(text) == ([text] if text else [])


def test_partial_text_ends_in_an_incomplete_segment(tok):
    ids = tok.encode("The food was lovely. The service, however, was")
    segs = segment_response(ids, tok, "sentence")
    assert [s.text for s in segs] == ["The food was lovely.", " The service, however, was"]
    assert [s.complete for s in segs] == [True, False]
    clauses = segment_response(ids, tok, "clause", min_tokens=1)
    assert [s.text for s in clauses] == ["The food was lovely.", " The service,", " however,", " was"]
    assert [s.complete for s in clauses] == [True, True, True, False]
    merged = segment_response(ids, tok, "clause", min_tokens=2)  # the 1-token " was" joins " however,"
    assert [s.text for s in merged] == ["The food was lovely.", " The service,", " however, was"]


def test_token_spans_tile_the_response_and_decode_to_the_segment_text(tok):
    text = "Sure! Here's how: first, preheat the oven to 180°C — it matters.\nThen wait 5 minutes… Café au lait? Yes"
    ids = tok.encode(text)
    for unit in ("sentence", "clause"):
        segs = segment_response(ids, tok, unit, min_tokens=1)
        assert segs[0].start == 0 and segs[-1].end == len(ids)
        assert all(a.end == b.start for a, b in pairwise(segs))  # contiguous, no gaps
        assert "".join(s.text for s in segs) == tok.decode(ids)
        for s in segs:
            assert tok.decode(ids[s.start:s.end]) == s.text  # span and text agree
    sentences = [s.text for s in segment_response(ids, tok, "sentence", min_tokens=1)]
    assert sentences == ["Sure!", " Here's how: first, preheat the oven to 180°C — it matters.\n",
                         "Then wait 5 minutes…", " Café au lait?", " Yes"]


def test_characters_split_across_tokens_keep_spans_right(tok):
    # "🙂" and "日本語" are several byte-level tokens each; decoding token by token would count
    # replacement characters and misplace every later boundary
    text = "I love it 🙂. 日本語 is fun! Really"
    ids = tok.encode(text)
    segs = segment_response(ids, tok, "sentence", min_tokens=1)
    assert [s.text for s in segs] == ["I love it 🙂.", " 日本語 is fun!", " Really"]
    assert [tok.decode(ids[s.start:s.end]) for s in segs] == [s.text for s in segs]


def test_short_segments_merge_and_run_on_text_splits_at_a_word(tok):
    ids = tok.encode("Yes. " + " ".join(["word"] * 30))
    segs = segment_response(ids, tok, "sentence", min_tokens=3, max_tokens=12)
    assert segs[0].text.startswith("Yes. word")  # "Yes." (2 tokens) joined the next segment
    assert [s.end - s.start for s in segs] == [12, 12, 8]  # 2 + 30 tokens
    assert all(s.text.startswith(" ") for s in segs[1:])  # split before a word, not inside one
    eos = tok.encode("Fine. Good.") + [tok.eos_token_id]
    segs = segment_response(eos, tok, "sentence", min_tokens=1)
    assert segs[-1].end == len(eos) and segs[-1].text == " Good."  # EOS rides in the last span


def test_unknown_unit_is_refused():
    with pytest.raises(ValueError, match="unit must be one of"):
        boundaries("a. b", "paragraph")
