"""Split an answer into segments (sentences or clauses) and map each to its span of response tokens.

Segments are semantic units of dynamic length (seed 001: "semantically complete text segments"),
found in the decoded text by punctuation:

- `sentence`: a segment ends after `.`, `!`, `?` or `...`/`…` (with closing quotes or brackets)
  followed by whitespace, and at every line break (lists, paragraphs).
- `clause`: sentence ends, plus `,`, `;`, `:` and dashes (` - `, `–`, `—`) followed by whitespace.

Punctuation not followed by whitespace ("3.5", "e.g.x", "U.S.A") never ends a segment, nor does a
period after a known abbreviation ("Dr.", "e.g.", "etc." is not one: it usually ends a sentence)
or after a single letter (initials: "J. R. R.") or a list number opening a line ("2. Mix"). Text without any boundary is one segment, so a
partial answer (a prefix cut mid-sentence) ends with a partial segment (`complete` False). A segment
shorter than `min_tokens` joins the next one (a list number "1." or a lone "Yes,"); one longer than
`max_tokens` is split at its last word start before the limit, so run-on text without punctuation
still gets segments.

Why a regex and not a library: pysbd and NLTK's punkt (which needs a data download) split whole
documents into sentences; neither splits clauses, and both are built for finished text, while
answers here are often cut at `max_new_tokens`. These rules are few, offline and tested on partial
text (tests/prefix_scorers/test_segments.py).

Token spans come from the cumulative decode: token i ends at character len(decode(ids[:i+1])), and
a segment ends at the first token whose text reaches the segment's last character. Decoding whole
prefixes (not token by token) keeps byte-level BPE and multi-byte characters right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

Unit = Literal["sentence", "clause"]
UNITS: tuple[str, ...] = ("sentence", "clause")

_CLOSERS = re.escape("\"')]}»”’*")  # closing quotes, brackets and markdown emphasis
# punctuation (+ closers) then whitespace, a line break included in the segment it ends
_SENTENCE = re.compile(rf"(?:\.\.\.|…|[.!?])+[{_CLOSERS}]*(?:[ \t]*\n+|(?=\s))|\n+")
_CLAUSE = re.compile(rf"(?:\.\.\.|…|[.!?,;:])+[{_CLOSERS}]*(?:[ \t]*\n+|(?=\s))|\n+|\s[-–—]+(?=\s)|[–—](?=\S)")
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "e.g", "i.e", "approx",
                            "no", "fig", "inc", "ltd", "co", "mt", "jan", "feb", "mar", "apr", "aug",
                            "sep", "sept", "oct", "nov", "dec"})
_WORD_BEFORE = re.compile(r"([A-Za-z](?:[A-Za-z.]*[A-Za-z])?)$")
_LIST_MARKER = re.compile(r"(?:^|\n)[ \t]*(?:\d+|[A-Za-z])$")  # "1." or "a." opening a line


@dataclass(frozen=True)
class Segment:
    """One segment of a response: tokens [start, end) and characters [char_start, char_end)."""

    index: int
    start: int
    end: int
    char_start: int
    char_end: int
    text: str
    complete: bool  # ends at a boundary (False: the text stops mid-segment)


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the '.' at text[dot] follows an abbreviation, a single-letter initial or a list
    number opening a line."""
    if _LIST_MARKER.search(text, 0, dot):
        return True
    m = _WORD_BEFORE.search(text, 0, dot)
    if not m:
        return False
    word = m.group(1).lower()
    return len(word) == 1 or word in _ABBREVIATIONS


def boundaries(text: str, unit: Unit = "sentence") -> list[int]:
    """Character offsets where a segment ends (after the punctuation and closers, before the
    whitespace that follows), in increasing order; the end of the text is not included."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    pattern = _SENTENCE if unit == "sentence" else _CLAUSE
    out = []
    for m in pattern.finditer(text):
        if m.group().startswith(".") and not m.group().startswith("...") and _is_abbreviation(text, m.start()):
            continue
        end = m.end()
        if 0 < end < len(text) and (not out or end > out[-1]):
            out.append(end)
    return out


def token_char_ends(token_ids: list[int], tokenizer) -> list[int]:
    """Character offset in the decoded response where each token's text ends (non-decreasing)."""
    ends, best = [], 0
    for i in range(len(token_ids)):
        best = max(best, len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True)))
        ends.append(best)
    return ends


def spans_from_ends(char_ends: list[int], cuts: list[int], min_tokens: int = 1,
                    max_tokens: int | None = None, word_starts: set[int] | None = None) -> list[tuple[int, int]]:
    """Token spans [start, end) from per-token character ends and character cut points."""
    n = len(char_ends)
    ends, i = [], 0
    for c in cuts:  # a segment ends at the first token whose text reaches the cut
        while i < n and char_ends[i] < c:
            i += 1
        if i < n - 1 and (not ends or i + 1 > ends[-1]):
            ends.append(i + 1)
    if n and (not ends or ends[-1] != n):
        ends.append(n)
    spans, start = [], 0
    for e in ends:
        spans.append((start, e))
        start = e
    merged: list[tuple[int, int]] = []
    for s, e in spans:  # a too-short segment joins the next one (the last joins the previous)
        if merged and merged[-1][1] - merged[-1][0] < min_tokens:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    if len(merged) > 1 and merged[-1][1] - merged[-1][0] < min_tokens:
        merged[-2:] = [(merged[-2][0], merged[-1][1])]
    if max_tokens:
        merged = [piece for s in merged for piece in _split_long(s, max_tokens, word_starts)]
    return merged


def _split_long(span: tuple[int, int], max_tokens: int, word_starts: set[int] | None) -> list[tuple[int, int]]:
    s, e = span
    out = []
    while e - s > max_tokens:
        cut = max((t for t in (word_starts or ()) if s < t <= s + max_tokens), default=s + max_tokens)
        out.append((s, cut))
        s = cut
    out.append((s, e))
    return out


def segment_response(token_ids: list[int], tokenizer, unit: Unit = "sentence", min_tokens: int = 2,
                     max_tokens: int | None = 32) -> list[Segment]:
    """The segments of a response given as token ids (special tokens such as EOS are kept in the
    last segment's span but not in its text)."""
    if not token_ids:
        return []
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    char_ends = token_char_ends(token_ids, tokenizer)
    # a token whose decoded text starts with whitespace starts a word: a place to split run-on text
    word_starts = {i for i in range(1, len(token_ids))
                   if char_ends[i] > char_ends[i - 1] and text[char_ends[i - 1]].isspace()}
    cuts = boundaries(text, unit)
    spans = spans_from_ends(char_ends, cuts, min_tokens, max_tokens, word_starts)
    out = []
    for k, (s, e) in enumerate(spans):
        c0 = char_ends[s - 1] if s else 0
        c1 = char_ends[e - 1]
        out.append(Segment(k, s, e, c0, c1, text[c0:c1], _complete(text[c0:c1], unit)))
    return out


def _complete(piece: str, unit: Unit) -> bool:
    """Whether a segment's text ends at a boundary (trailing whitespace aside)."""
    body = piece.rstrip()
    if "\n" in piece[len(body):]:
        return True
    return bool(body) and len(body) in boundaries(body + " ", unit)


def segment_text(text: str, unit: Unit = "sentence") -> list[str]:
    """The segments of a plain text (no tokenizer): the pieces between `boundaries`."""
    cuts = [0, *boundaries(text, unit), len(text)]
    return [text[a:b] for a, b in pairwise(cuts) if text[a:b]]
