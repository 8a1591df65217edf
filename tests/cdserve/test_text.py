"""Stop strings and what may be streamed yet (cdserve/text.py), on texts worked out by hand."""

from __future__ import annotations

from cdserve.text import find_stop, safe_prefix_len

R = "\ufffd"  # what decoding an unfinished UTF-8 character gives


def test_the_earliest_stop_wins_whatever_its_place_in_the_list():
    assert find_stop("abcSTOPdefEND", ("END", "STOP")) == 3
    assert find_stop("abc", ("END", "STOP")) == -1


def test_the_search_starts_where_it_is_told():
    # a stop already checked (at 0) is not found again; one across the old end (at 6) is
    assert find_stop("STOP..STOP", ("STOP",), start=1) == 6


def test_a_tail_that_could_start_a_stop_string_is_held_back():
    assert safe_prefix_len("Hello wor", ("world!",)) == 6  # "wor" may become "world!"
    assert safe_prefix_len("Hello wor", ("planet",)) == 9  # nothing to hold
    assert safe_prefix_len("Hello world!", ("world!",)) == 12  # a whole stop is find_stop's


def test_an_unfinished_character_is_held_back():
    assert safe_prefix_len(f"ab{R}{R}", ()) == 2
    assert safe_prefix_len(f"ab{R}", ("b!",)) == 1  # then the "b" before it may start "b!"


def test_the_longest_tail_that_starts_some_stop_is_held_back_and_no_more():
    # "xy" may start "xyz" (hold 2) although "y" alone may start "yq" (hold 1): hold 2
    assert safe_prefix_len("axy", ("yq", "xyz")) == 1
    assert safe_prefix_len("axy", ("xyz", "yq")) == 1
    # "b" may start "b1"; "ab" starts neither stop (the "a" is followed by "b", not "2"): hold 1
    assert safe_prefix_len("ab", ("b1", "a2")) == 1
