"""Detokenising generated ids: stop strings and safe streaming deltas."""

from __future__ import annotations


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int:
    """Index of the earliest stop string in text[start:] (-1 if none)."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def safe_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the prefix of `text` that can be streamed now: hold back an unfinished UTF-8
    character (decoded as U+FFFD) and the longest suffix that could be the start of a stop string
    (only that: "ab" with stops "b1" and "a2" holds "b" alone)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), hold, -1):
            if text[:end].endswith(s[:k]):
                hold = k
                break
    return end - hold


def eos_token_ids(model_dir, tokenizer) -> set[int]:
    """Tokens that end an answer: the tokenizer's EOS and the generation config's (as vLLM stops)."""
    from transformers import GenerationConfig

    eos = {tokenizer.eos_token_id}
    try:
        gen = GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id
    except OSError:  # no generation_config.json
        gen = None
    eos |= set(gen if isinstance(gen, list) else [gen])
    return eos - {None}
