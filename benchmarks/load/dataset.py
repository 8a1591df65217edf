"""The prompts every server gets: the project's held-out prompts (JSONL, "prompt" field), cycled
to the run's size, optionally behind a context passage of about `prompt_len` extra tokens, written
as the JSONL that `vllm bench serve --dataset-name custom` reads. Same file, same order for every
server of a run, so the comparison holds the prompts fixed.

The passage is distinct per request by default (it opens with the request's number), so prefix
caching cannot share it: long prompts cost their prefill. `shared=True` gives every request the
same passage (a fixed document in front of many questions), which prefix caching serves once."""

from __future__ import annotations

import json
from itertools import cycle, islice
from pathlib import Path

# Neutral filler for long-prompt runs: the tokens count, their content should not steer anything.
_CONTEXT = ("The following notes describe an ordinary day in a small town. The bakery opens early, "
            "the bus leaves at eight, the library lends books and maps, and the market sells fruit, "
            "bread and flowers. People walk to work, children go to school, and in the evening the "
            "square fills with neighbours who talk about the weather and the news. ")


def _filler(tokenizer, num_tokens: int) -> str:
    """About `num_tokens` tokens of filler text, cut on a token boundary ('' for 0)."""
    ids: list[int] = []
    piece = tokenizer(_CONTEXT, add_special_tokens=False).input_ids
    while len(ids) < num_tokens:
        ids += piece
    return tokenizer.decode(ids[:num_tokens]).strip()



def write_prompts(source: Path, out: Path, count: int, tokenizer, prompt_len: int = 0,
                  shared: bool = False, salt: str = "") -> Path:
    """`salt` makes the distinct passages differ from another file's (give each run its own, so no
    run finds another's prompts in a server's prefix cache)."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{source} holds no prompts")
    filler = _filler(tokenizer, prompt_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i, row in enumerate(islice(cycle(rows), count)):
            tag = "" if shared else f" (note {salt}{i})"
            prefix = f"Background{tag}: {filler}\n\n" if filler else ""
            f.write(json.dumps({"prompt": prefix + row["prompt"]}) + "\n")
    return out
