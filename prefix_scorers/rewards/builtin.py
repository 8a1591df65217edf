"""The built-in rewards behind the default scorer's heads (and `civility`). All run offline.

| reward           | head      | range    | formula                                                        |
|------------------|-----------|----------|----------------------------------------------------------------|
| `vader_compound` | positive  | [-1, 1]  | VADER compound sentiment score of the text                     |
| `specificity_prose` | specific | [0, 1]   | as `specificity_english`, emoji count as words, at least 12 words (below) |
| `specificity_english` | -       | [0, 1]   | distinct rare English words and (capped) numbers / words (below) |
| `specificity_distinct` | -     | [0, 1]   | distinct numbers and rare real words / words (below)           |
| `concise_tokens` | concise   | [0, 1]   | max(0, 1 - tokens / 128), tokens of SmolLM2's tokenizer         |
| `readable`       | readable  | [0, 1]   | clip(Flesch reading ease, 0, 100) / 100                         |
| `civility`       | -         | [0, 1]   | 1 - P(offensive) from alt-profanity-check's linear SVM          |
| `specificity`    | -         | [0, 1]   | share of words that are numbers or rare real words (below)      |
| `concise`        | -         | [0, 1]   | max(0, 1 - words / 50), words = whitespace-separated tokens     |

`concise` and `specificity` trained the heads of earlier default scorers, and steering hacked
both: `concise` counts whitespace-separated words, so "A-B-A-B-A..." or a run of emoji is one
"word" for many tokens (at 128 tokens, steered answers had 0.55x the words but 0.90x the tokens);
`specificity` is a share of words, so repeating one number or rare word raises it (repetition
0.077 vs 0.005 at strength 4). Their successors measure what a user wants: `concise_tokens`
counts the tokens an answer costs (SmolLM2's tokenizer, the embedded base model's; another
base model's tokenizer splits text nearly alike, and the count is the same for every mode
compared), and `specificity_distinct` counts each specific word once. Steering hacked that
one too (strength 4: answers of bare numbers, "11 26 2020 24", and Spanish loops, "esos esos",
whose words are rare in English; repetition 0.057 vs 0.005): `specificity_english` (the `specific`
head's reward in scorer 3d045851311a) counts a word only if it is English (its English Zipf
frequency is at most `FOREIGN_MARGIN` below its frequency in any of `OTHER_LANGUAGES`) and counts
distinct numbers only up to `NUMBERS_PER_WORD` per English word, so a number needs prose around it.
Steering hacked its denominator in turn (strength 4, 48 prompts): a word followed by a run of
emoji ("Deafens! 📌📌📌...") scored 1.0, emoji not being words, and so did one-word answers
("Unreal."). `specificity_prose`, the `specific` head's reward since then, counts each emoji (and
any other Unicode "Symbol, other" character) as a word and divides by at least `MIN_PROSE_WORDS`,
as if a shorter answer were padded with plain words: "Unreal." scores 1/12. On 376 plain held-out
answers it agrees with `specificity_english` (correlation 0.90, mean 0.094 vs 0.101).
The older rewards stay registered, unchanged, for requests and results that name them.

Flesch reading ease = 206.835 - 1.015 * words/sentences - 84.6 * syllables/words, with words and
sentences counted by textstat (`lexicon_count`, `sentence_count`) and syllables by the en_US
hyphenation dictionary that ships with pyphen (hyphenation points + 1 per word). textstat's own
`flesch_reading_ease` looks syllables up in NLTK's cmudict, which must be downloaded; pyphen is
textstat's own fallback for words cmudict lacks, so this is the same formula, offline and
identical on every machine. An empty text scores 0 (readable) and 1 (concise).

`specificity` replaced `civility` in the default scorer: SmolLM2's answers are already civil
(0.96 on average), so that head had nothing to steer. Specific answers name things: numbers,
names and precise terms ("chlorophyll", "Bluetooth", "30 minutes") rather than common words
("good", "things", "important"). Words are runs of letters (with an inner apostrophe) of three or
more letters, and runs of digits; a word is specific if it is a number or if wordfreq's English
Zipf frequency (log10 of occurrences per billion words: 4 is once in 100,000 words, "budget" 4.8,
"recipe" 4.2, "bluetooth" 3.8, "chlorophyll" 2.8) is below `RARE_ZIPF` (4) but above 0. Words wordfreq does not know (Zipf 0: typos,
made-up words) do not count, so gibberish does not score. Measured on 522 SmolLM2-135M-Instruct
answers (48 tokens, temperature 0.7): mean 0.10, std 0.09 (prefix_scorers/README.md). The data
ships with the wordfreq package: nothing is downloaded. An empty text scores 0.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

from prefix_scorers.rewards.registry import register_reward

CONCISE_WORDS = 50  # an answer of this many words (or more) scores 0 on `concise`
CONCISE_TOKENS = 128  # `concise_tokens`: an answer of this many tokens (or more) scores 0
RARE_ZIPF = 4.0  # `specificity`: words rarer than this Zipf frequency count as specific
# `specificity_english`: a word more than this much (Zipf: log10, so 100x) more frequent in another
# language than in English is foreign ("esos" 1.7 in English, 5.5 in Spanish; "della" 3.4 / 6.9);
# English words shared with others stay English ("espresso" 3.4 / 4.6, "ambiance" 2.7 / 4.6)
OTHER_LANGUAGES = ("es", "fr", "de", "it", "pt", "nl")
FOREIGN_MARGIN = 2.0
NUMBERS_PER_WORD = 0.5  # distinct numbers count up to half the English words ("180 degrees", not "11 26 2020")
MIN_PROSE_WORDS = 12  # `specificity_prose` divides by at least this many words (5% of plain answers are shorter)
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_SPECIFIC_TOKEN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+(?:[.,]\d+)*")


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


@lru_cache(maxsize=1)
def _smollm2_tokenizer():
    from prefix_scorers.base_model import default_cache_dir, load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2", default_cache_dir()))


@register_reward("concise_tokens", description=f"Shorter answers score higher: max(0, 1 - tokens / "
                 f"{CONCISE_TOKENS}), tokens of SmolLM2's tokenizer.", reward_range=(0.0, 1.0))
def concise_tokens(texts: Sequence[str]) -> list[float]:
    if not texts:
        return []
    ids = _smollm2_tokenizer()(list(texts), add_special_tokens=False)["input_ids"]
    return [max(0.0, 1.0 - len(t) / CONCISE_TOKENS) for t in ids]


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


@lru_cache(maxsize=400_000)
def _zipf(word: str, lang: str = "en") -> float:
    from wordfreq import zipf_frequency

    return zipf_frequency(word, lang)


def is_specific(word: str) -> bool:
    """A number, or a real but rare English word (0 < Zipf frequency < RARE_ZIPF)."""
    if word[0].isdigit():
        return True
    return 0.0 < _zipf(word.lower()) < RARE_ZIPF


def _specific_words(text: str) -> list[str]:
    """The words the specificity rewards count: runs of 3+ letters, and numbers."""
    return [w for w in _SPECIFIC_TOKEN.findall(text) if w[0].isdigit() or len(w) >= 3]


def specificity(text: str, distinct: bool = False) -> float:
    words = _specific_words(text)
    specific = [w for w in words if is_specific(w)]
    if distinct:  # each specific word (case-folded) counts once: repeating one does not pay
        specific = list({w.lower() for w in specific})
    return len(specific) / len(words) if words else 0.0


def is_english(word: str) -> bool:
    """A word wordfreq knows in English that is not far more frequent in another language."""
    word = word.lower()
    en = _zipf(word)
    return en > 0.0 and all(_zipf(word, lang) - en <= FOREIGN_MARGIN for lang in OTHER_LANGUAGES)


def specificity_english(text: str) -> float:
    """(distinct rare English words + min(distinct numbers, NUMBERS_PER_WORD x English words)) / words,
    words as in `specificity` (3+ letters, or numbers); foreign words and non-words count as words."""
    words = _specific_words(text)
    return _english_specific(words) / len(words) if words else 0.0


def _english_specific(words: list[str]) -> int:
    """Distinct rare English words plus distinct numbers, at most NUMBERS_PER_WORD per English word."""
    english = [w for w in words if not w[0].isdigit() and is_english(w)]
    rare = {w.lower() for w in english if is_specific(w)}
    numbers = {w for w in words if w[0].isdigit()}
    return len(rare) + min(len(numbers), int(NUMBERS_PER_WORD * len(english)))


def specificity_prose(text: str) -> float:
    """`specificity_english` with each emoji (Unicode category So) counted as a word and at least
    `MIN_PROSE_WORDS` words in the denominator: neither padding nor brevity pays."""
    words = _specific_words(text)
    symbols = sum(unicodedata.category(c) == "So" for c in text)
    return _english_specific(words) / max(len(words) + symbols, MIN_PROSE_WORDS)


@register_reward("specificity", description=f"Specific wording: share of words that are numbers or rare "
                 f"(wordfreq Zipf frequency < {RARE_ZIPF:g}).", reward_range=(0.0, 1.0))
def specificity_reward(texts: Sequence[str]) -> list[float]:
    return [specificity(t) for t in texts]


@register_reward("specificity_distinct", description="Specific wording: distinct numbers and rare words "
                 f"(wordfreq Zipf frequency < {RARE_ZIPF:g}) per word; a repeated one counts once.",
                 reward_range=(0.0, 1.0))
def specificity_distinct_reward(texts: Sequence[str]) -> list[float]:
    return [specificity(t, distinct=True) for t in texts]


@register_reward("specificity_english", description="Specific English wording: distinct rare English words "
                 f"(wordfreq Zipf < {RARE_ZIPF:g}, not far more frequent in {'/'.join(OTHER_LANGUAGES)}) and "
                 f"distinct numbers (at most {NUMBERS_PER_WORD:g} per English word) per word.",
                 reward_range=(0.0, 1.0))
def specificity_english_reward(texts: Sequence[str]) -> list[float]:
    return [specificity_english(t) for t in texts]


@register_reward("specificity_prose", description="Specific English prose: `specificity_english` with each emoji "
                 f"counted as a word and at least {MIN_PROSE_WORDS} words in the denominator.",
                 reward_range=(0.0, 1.0))
def specificity_prose_reward(texts: Sequence[str]) -> list[float]:
    return [specificity_prose(t) for t in texts]
