"""The built-in rewards on fixed texts, and the registry (callables and HTTP endpoints)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from prefix_scorers.rewards import (
    get_reward,
    list_rewards,
    register_http_reward,
    register_reward,
    score_texts,
)

HAPPY = "I absolutely love this place, the staff were wonderful and kind!"
ANGRY = "This is the worst service ever. You stupid idiots ruined my day."
PLAIN = "The cat sat on the mat. It was a sunny day."
HARD = ("The mitochondrial electron transport chain facilitates oxidative phosphorylation "
        "through chemiosmotic coupling of transmembrane proton gradients.")


def test_builtin_rewards_are_registered_with_ranges():
    names = {r.name: r.reward_range for r in list_rewards()}
    assert names["vader_compound"] == (-1.0, 1.0)
    for name in ("civility", "concise", "concise_tokens", "readable", "specificity", "specificity_distinct",
                 "specificity_english", "specificity_prose"):
        assert names[name] == (0.0, 1.0)


def test_vader_compound_orders_sentiment():
    happy, angry, empty = get_reward("vader_compound")([HAPPY, ANGRY, ""])
    assert happy > 0.5 and angry < -0.5 and empty == 0.0


def test_civility_flags_insults():
    civil, rude = get_reward("civility")([PLAIN, ANGRY])
    assert civil > 0.8 and rude < 0.2


def test_concise_formula():
    words40 = " ".join(["word"] * 40)
    assert get_reward("concise")(["", "one two three four five", words40, words40 + words40]) == \
        pytest.approx([1.0, 0.9, 0.2, 0.0])


def test_concise_tokens_counts_what_an_answer_costs():
    """Steering hacked the word count: a run of dashes or emoji is one 'word' for many tokens.
    Counted in tokens, that run is long; a plain sentence of more words is shorter."""
    from prefix_scorers.rewards.builtin import _smollm2_tokenizer

    hack = "A-B-" * 24 + " " + "\U0001F441" * 12
    plain = "The cat sat on the mat and looked at the sunny garden all day."
    n_hack = len(_smollm2_tokenizer()(hack, add_special_tokens=False)["input_ids"])
    n_plain = len(_smollm2_tokenizer()(plain, add_special_tokens=False)["input_ids"])
    words, tokens = get_reward("concise")([hack, plain]), get_reward("concise_tokens")([hack, plain, ""])
    assert words[0] > words[1]  # the old reward prefers the hack
    assert tokens[0] < tokens[1]  # the new one does not
    assert tokens == pytest.approx([max(0, 1 - n_hack / 128), 1 - n_plain / 128, 1.0])
    assert n_hack > 50 and n_plain < 20


def test_specificity_distinct_does_not_pay_for_repeats():
    once, repeated = "Bake it for 30 minutes at 180 degrees.", "Bake it for 30 minutes at 180 degrees. 2023 2023 2023 2023"
    old, new = get_reward("specificity")([once, repeated]), get_reward("specificity_distinct")([once, repeated, ""])
    assert old[1] > old[0]  # repeating a number raised the old share
    assert new[0] == pytest.approx(3 / 6) and new[1] == pytest.approx(4 / 10) and new[2] == 0.0
    assert new[1] < new[0]


def test_specificity_english_does_not_pay_for_bare_numbers_or_foreign_words():
    """Steering the `specific` head at strength 4 (default 38e9118b6e72) found two ways to score on
    `specificity_distinct` without being specific: answers of bare numbers, and Spanish, whose
    words are rare in English. `specificity_english` pays for neither; English answers score as before."""
    recipe = "Bake it for 30 minutes at 180 degrees with cardamom."
    numbers = "11 26 2020 24 24 24"
    spanish = "La scoala de este dia en el lado de esos esos esos"
    english_loanwords = "An espresso with ambiance and chlorophyll."
    old = get_reward("specificity_distinct")([recipe, numbers, spanish, english_loanwords])
    new = get_reward("specificity_english")([recipe, numbers, spanish, english_loanwords, "", "42"])
    assert old[1] > 0.5 and old[2] > 0.3  # the hacks paid under the old reward
    # recipe: words Bake, for, 30, minutes, 180, degrees, with, cardamom (8); 6 English words, so up
    # to 3 numbers count (30 and 180), plus the rare words bake and cardamom
    assert new[0] == pytest.approx(4 / 8) and new[0] == pytest.approx(old[0])
    assert new[1] == 0.0  # no English words: no number counts
    assert new[2] == 0.0  # este, dia, lado, esos: far more frequent in Spanish than in English
    assert new[3] == pytest.approx(old[3]) and new[3] > 0.5  # loanwords stay English
    assert new[4:] == [0.0, 0.0]


def test_specificity_english_caps_numbers_by_the_prose_around_them():
    from prefix_scorers.rewards.builtin import NUMBERS_PER_WORD, specificity_english

    text = "Research shows 2008 2009 2010 2011"  # 2 English words: at most one number counts
    assert int(NUMBERS_PER_WORD * 2) == 1
    assert specificity_english(text) == pytest.approx(1 / 6)
    assert specificity_english("Research shows 2008 figures") == pytest.approx(1 / 4)


def test_specificity_prose_does_not_pay_for_emoji_padding_or_one_word_answers():
    """Steering `specific` (specificity_english) at strength 4 (default 3d045851311a) answered with a
    word and a run of emoji, or one rare word: both scored 1.0. `specificity_prose` counts each emoji
    as a word and divides by at least MIN_PROSE_WORDS; prose of that length scores as before."""
    from prefix_scorers.rewards.builtin import MIN_PROSE_WORDS

    padded, one_word = "Deafens! " + "\U0001F4CC" * 14, "Unreal."
    prose = "The ancient dragon guarded a hoard of 300 sapphires deep inside the volcanic caldera beneath the mountains."
    old = get_reward("specificity_english")([padded, one_word, prose])
    new = get_reward("specificity_prose")([padded, one_word, prose, "", "\U0001F4CC" * 20])
    assert old[:2] == [1.0, 1.0]  # the hacks paid under the old reward
    assert MIN_PROSE_WORDS == 12
    assert new[0] == pytest.approx(1 / 15)  # Deafens + 14 emoji
    assert new[1] == pytest.approx(1 / 12)  # one word, scored as if padded to twelve
    assert len(prose.split()) > MIN_PROSE_WORDS and new[2] == pytest.approx(old[2]) and new[2] > 0.2
    assert new[3:] == [0.0, 0.0]


def test_readable_prefers_plain_text():
    plain, hard, empty = get_reward("readable")([PLAIN, HARD, ""])
    assert plain > 0.8 and hard < 0.2 and empty == 0.0


def test_specificity_counts_numbers_and_rare_real_words():
    plain, specific, number, gibberish, empty = get_reward("specificity")([
        "It is a good thing and very important for all of us.",
        "Chlorophyll absorbs light for photosynthesis.",  # 3 of 5 words rare: chlorophyll, absorbs, photosynthesis
        "Bake it for 30 minutes at 180 degrees.",  # 30, 180 of 6 words (bake: Zipf < 4 too)
        "Xqzt blorptang vrrmfl.",  # unknown to wordfreq: not specific
        ""])
    assert plain == 0.0 and empty == 0.0 and gibberish == 0.0
    assert specific == pytest.approx(3 / 5)
    assert number == pytest.approx(3 / 6)


def test_registry_callable_and_range_check():
    register_reward("says_please", lambda ts: [float("please" in t) for t in ts], replace=True)
    assert score_texts(["please", "no"], ["says_please"]) == {"says_please": [1.0, 0.0]}
    register_reward("broken", lambda ts: [2.0 for _ in ts], reward_range=(0.0, 1.0), replace=True)
    with pytest.raises(ValueError, match="outside its declared range"):
        get_reward("broken")(["x"])
    with pytest.raises(KeyError, match="unknown reward"):
        get_reward("nope")


def test_http_reward():
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["texts"]
            body = json.dumps({"scores": [len(t) / 100 for t in texts]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        register_http_reward("length_api", f"http://127.0.0.1:{server.server_port}/score", batch_size=2,
                             replace=True)
        assert get_reward("length_api")(["a" * 10, "b" * 20, "c"]) == pytest.approx([0.1, 0.2, 0.01])
    finally:
        server.shutdown()
