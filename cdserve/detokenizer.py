"""Incremental detokenising, shared by both engines: the text of a growing answer at the cost of
two short decodes per token, where decoding the whole answer at every token costs O(L) per token
(O(L^2) per answer).

The scheme is vLLM's `detokenize_incrementally` (transformers' `TextStreamer` does the same): keep
a window of ids that starts where the previous final text was read; decode the window and the part
of it already read; what the first adds to the second is new text. Decoding from a token boundary
a few tokens back, rather than the new token alone, keeps what depends on context right
(SentencePiece's leading space, a UTF-8 character split over byte tokens). New text that ends in an
unfinished character (decoded as U+FFFD) is not made final: its tokens are read again with the
next one. `text` is what a full decode of all the ids gives, U+FFFD tail included (so stop-string
checks and streaming see what they saw before; `safe_prefix_len` holds the tail back).

A `Detokenizer` is an immutable value: `push` returns a new one, so block candidates fork from the
accepted answer's detokeniser by sharing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

REPLACEMENT = "\ufffd"  # what decoding an unfinished UTF-8 character gives


@dataclass(frozen=True)
class Detokenizer:
    decode: Callable[[list[int]], str]  # ids -> text (tokenizer.decode with skip_special_tokens)
    window: tuple[int, ...] = ()  # ids from the start of the last final text on
    read: int = 0  # window[:read] is already part of `final`
    final: str = ""  # text that no later token can change
    text: str = ""  # the whole text: `final` and what the unread ids decode to (maybe unfinished)

    def push(self, token: int) -> Detokenizer:
        window = self.window + (token,)
        prefix = self.decode(list(window[:self.read])) if self.read else ""
        new = self.decode(list(window))
        tail = new[len(prefix):]
        if tail and not new.endswith(REPLACEMENT):  # a finished character: final from here on
            final = self.final + tail
            return Detokenizer(self.decode, window[self.read:], len(window) - self.read, final, final)
        return Detokenizer(self.decode, window, self.read, self.final, self.final + tail)
