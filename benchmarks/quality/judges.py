"""What the quality benchmark measures on answers besides the trained rewards (GRUE-style, seed 003):
an independent judge of the steered quality, fluency, and perplexity under the base model.

- `afinn_scores`: the AFINN-165 sentiment lexicon (Nielsen 2011; PyPI `afinn`, offline): the sum
  of the valences (-5..5) of an answer's words. A second lexicon, built apart from VADER's, that
  no scorer here was trained on: a judge of `positive` that steering cannot have fitted to.
- `nonword_share`: words (wordfreq's tokenizer) that wordfreq's English list (`best`, offline)
  has never seen, among words with a letter: gibberish and broken words.
- `repetition`: share of an answer's word 3-grams that repeat an earlier 3-gram of the same answer.
- `distinct_2`: distinct word bigrams over all bigrams of a set of answers (compare sets of
  the same size: it falls as the set grows).
- `Perplexity`: the base model's (SmolLM2) perplexity of each answer given its prompt (chat
  template, as the server renders it), computed in-process with transformers on the answer text
  re-tokenised, in bfloat16 by default (AMX makes it several times faster on this CPU; the
  log-softmax is taken in float32); cached by text, so a rerun only scores new answers.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path


def afinn_scores(texts: Sequence[str]) -> list[float]:
    from afinn import Afinn

    afinn = Afinn(language="en")
    return [float(afinn.score(t)) for t in texts]


def _words(text: str) -> list[str]:
    import wordfreq

    return wordfreq.tokenize(text, "en")


def nonword_share(texts: Sequence[str]) -> float:
    """Share of words, over all the texts, that are not in wordfreq's English list."""
    import wordfreq

    words = [w for t in texts for w in _words(t) if any(c.isalpha() for c in w)]
    if not words:
        return 0.0
    return sum(wordfreq.zipf_frequency(w, "en") == 0.0 for w in words) / len(words)


def repetition(text: str, n: int = 3) -> float:
    """Share of the text's word n-grams that already occurred earlier in it."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct word bigrams over all word bigrams of the texts (lower-cased, whitespace words)."""
    grams = [tuple(ws[i:i + 2]) for t in texts for ws in [t.lower().split()] for i in range(len(ws) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class Perplexity:
    """Per-answer negative log-likelihood under the base model, cached on disk by (prompt, text)."""

    def __init__(self, cache_path: Path, model: str = "smollm2", batch_size: int = 8, dtype: str = "bfloat16"):
        self.cache_path = Path(cache_path)
        self.cache: dict[str, list[float]] = (json.loads(self.cache_path.read_text())
                                              if self.cache_path.exists() else {})
        self.model_name, self.batch_size, self.dtype = model, batch_size, dtype
        self.model = self.tokenizer = None

    @staticmethod
    def key(prompt: str, text: str) -> str:
        return hashlib.sha1(f"{prompt}\0{text}".encode()).hexdigest()[:20]

    def _load(self) -> None:
        import torch

        from prefix_scorers.base_model import (
            default_cache_dir,
            load_model,
            load_tokenizer,
            resolve_model,
        )

        folder = resolve_model(self.model_name, default_cache_dir())
        self.tokenizer, self.model = load_tokenizer(folder), load_model(folder, dtype=getattr(torch, self.dtype))

    def nll(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """(summed NLL in nats, answer tokens) per (prompt, answer); empty answers give (0, 0)."""
        todo = sorted({self.key(p, t): (p, t) for p, t in pairs if self.key(p, t) not in self.cache}.items())
        for i in range(0, len(todo), self.batch_size):
            self._score_batch(todo[i:i + self.batch_size])
            self.cache_path.write_text(json.dumps(self.cache))
        return [tuple(self.cache[self.key(p, t)]) for p, t in pairs]

    def _score_batch(self, batch: list[tuple[str, tuple[str, str]]]) -> None:
        import torch

        from prefix_scorers.rollouts import chat_prompt_ids

        if self.model is None:
            self._load()
        tok = self.tokenizer
        rows = []
        for key, (prompt, text) in batch:
            rows.append((key, chat_prompt_ids(tok, prompt), tok(text, add_special_tokens=False)["input_ids"]))
        width = max(len(h) + len(a) for _, h, a in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (_, h, a) in enumerate(rows):
            ids[r, :len(h) + len(a)] = torch.tensor(h + a)
            mask[r, :len(h) + len(a)] = 1
        with torch.no_grad():
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for r, (key, h, a) in enumerate(rows):
            if not a:
                self.cache[key] = [0.0, 0]
                continue
            pos = torch.arange(len(h) - 1, len(h) + len(a) - 1)
            nll = -logp[r, pos, torch.tensor(a)].sum().item()
            self.cache[key] = [nll, len(a)]

    def perplexity(self, pairs: Sequence[tuple[str, str]]) -> float:
        """exp(total NLL / total answer tokens) over the answers."""
        scored = self.nll(pairs)
        tokens = sum(n for _, n in scored)
        return math.exp(sum(x for x, _ in scored) / tokens) if tokens else float("nan")
