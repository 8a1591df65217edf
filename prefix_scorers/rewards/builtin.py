"""The four built-in rewards behind the default scorer's heads. All run offline.

| reward           | head      | range    | formula                                                        |
|------------------|-----------|----------|----------------------------------------------------------------|
| `vader_compound` | positive  | [-1, 1]  | VADER compound sentiment score of the text                     |
| `civility`       | civil     | [0, 1]   | 1 - P(offensive) from alt-profanity-check's linear SVM          |
| `concise`        | concise   | [0, 1]   | max(0, 1 - words / 50), words = whitespace-separated tokens     |
| `readable`       | readable  | [0, 1]   | clip(Flesch reading ease, 0, 100) / 100                         |

Flesch reading ease = 206.835 - 1.015 * words/sentences - 84.6 * syllables/words, with words and
sentences counted by textstat (`lexicon_count`, `sentence_count`) and syllables by the en_US
hyphenation dictionary that ships with pyphen (hyphenation points + 1 per word). textstat's own
`flesch_reading_ease` looks syllables up in NLTK's cmudict, which must be downloaded; pyphen is
textstat's own fallback for words cmudict lacks, so this is the same formula, offline and
identical on every machine. An empty text scores 0 (readable) and 1 (concise).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from prefix_scorers.rewards.registry import register_reward

CONCISE_WORDS = 50  # an answer of this many words (or more) scores 0 on `concise`
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=1)
def _pyphen():
    import pyphen

    return pyphen.Pyphen(lang="en_US")


@register_reward("vader_compound", description="Positive sentiment: VADER compound score.",
                 reward_range=(-1.0, 1.0))
def vader_compound(texts: Sequence[str]) -> list[float]:
    sia = _vader()
    return [sia.polarity_scores(t)["compound"] if t.strip() else 0.0 for t in texts]


@register_reward("civility", description="Not offensive: 1 - P(offensive) (alt-profanity-check).",
                 reward_range=(0.0, 1.0))
def civility(texts: Sequence[str]) -> list[float]:
    from profanity_check import predict_prob

    if not texts:
        return []
    return [1.0 - float(p) for p in predict_prob(list(texts))]


@register_reward("concise", description=f"Shorter answers score higher: max(0, 1 - words / {CONCISE_WORDS}).",
                 reward_range=(0.0, 1.0))
def concise(texts: Sequence[str]) -> list[float]:
    return [max(0.0, 1.0 - len(t.split()) / CONCISE_WORDS) for t in texts]


def syllables(word: str) -> int:
    return len(_pyphen().positions(word.lower())) + 1


def flesch_reading_ease(text: str) -> float:
    import textstat

    words = textstat.lexicon_count(text)
    if words == 0:
        return 0.0
    sentences = max(1, textstat.sentence_count(text))
    syl = sum(syllables(w) for w in _WORD.findall(text)) or words
    return 206.835 - 1.015 * words / sentences - 84.6 * syl / words


@register_reward("readable", description="Flesch reading ease, clipped to [0, 100], divided by 100.",
                 reward_range=(0.0, 1.0))
def readable(texts: Sequence[str]) -> list[float]:
    return [min(100.0, max(0.0, flesch_reading_ease(t))) / 100.0 for t in texts]
