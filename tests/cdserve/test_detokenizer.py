"""Incremental detokenising (cdserve/detokenizer.py) with real tokenizers: SmolLM2's byte-level
BPE on the model's own samples, and a SentencePiece-style byte-fallback tokenizer built with the
`tokenizers` library; and the choice controller's use of it (stops across tokens, O(L) work)."""

from __future__ import annotations

import random

import pytest
import torch

from cdserve.control.choice import ChoiceController
from cdserve.control.request import ControlConfig, resolve_control
from cdserve.detokenizer import REPLACEMENT, Detokenizer
from cdserve.sampling import SamplingParams
from prefix_scorers.base_model import load_model, load_tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def full_decoder(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def texts_as_pushed(decode, ids: list[int]) -> list[Detokenizer]:
    d, out = Detokenizer(decode), []
    for t in ids:
        d = d.push(t)
        out.append(d)
    return out


def test_text_equals_the_full_decode_at_every_token_of_smollm2_samples(smollm2_dir, smollm2_tokenizer):
    """Sampled answers of the real model (temperature 1.2: odd tokens, emoji, non-Latin scripts)."""
    tok = smollm2_tokenizer
    model = load_model(smollm2_dir)
    questions = ["Reply only with five emoji.", "Write one sentence in Japanese.",
                 "Say hello in Russian, Greek and Arabic.", "Écris une phrase en français avec des accents."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for q in questions]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.2, top_k=0,
                             max_new_tokens=24, pad_token_id=tok.pad_token_id)
    decode = full_decoder(tok)
    for answer in out[:, width:].tolist():
        for i, d in enumerate(texts_as_pushed(decode, answer)):
            assert d.text == decode(answer[:i + 1]), (answer, i)
            assert d.text.startswith(d.final) and REPLACEMENT not in d.text[len(d.final):].rstrip(REPLACEMENT)
    assert any(ord(ch) > 127 for answer in out[:, width:].tolist() for ch in decode(answer))  # multi-byte text


def test_text_equals_the_full_decode_on_random_byte_tokens(smollm2_tokenizer):
    """Mostly single-byte tokens: unfinished and invalid UTF-8 sequences, split anywhere."""
    tok = smollm2_tokenizer
    decode = full_decoder(tok)
    single = [i for t, i in tok.get_vocab().items() if len(t) == 1]
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.choice(single) if rng.random() < 0.7 else rng.randrange(len(tok)) for _ in range(24)]
        for i, d in enumerate(texts_as_pushed(decode, ids)):
            assert d.text == decode(ids[:i + 1])


@pytest.fixture(scope="module")
def byte_fallback_tokenizer():
    """Llama-style: pieces with '▁' for spaces, <0xNN> byte tokens for what the vocabulary lacks,
    and a decoder that strips the first leading space (so decoding depends on context)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1} | {f"<0x{b:02X}>": 2 + b for b in range(256)}
    for piece in ["▁", "▁Hello", "H", "e", "l", "o", "▁a"]:
        vocab[piece] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")


def test_byte_fallback_holds_an_unfinished_character_back(byte_fallback_tokenizer):
    tok = byte_fallback_tokenizer
    decode = full_decoder(tok)
    ids = tok.encode("Hello wörld 🙂 a", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[14:18] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]  # the emoji
    states = texts_as_pushed(decode, ids)
    for i in (14, 15, 16):  # 1-3 bytes of the emoji: not final, shown as U+FFFD like a full decode
        assert states[i].final == "Hello wörld " and states[i].text == "Hello wörld " + REPLACEMENT * (i - 13)
    assert states[17].final == states[17].text == "Hello wörld 🙂"
    assert states[-1].text == decode(ids) == "Hello wörld 🙂 a"
    for i, d in enumerate(states):  # wherever the full decode is finished text, the same text
        full = decode(ids[:i + 1])
        if REPLACEMENT not in full:
            assert d.final == d.text == full, i


def test_only_the_answers_first_space_is_stripped(byte_fallback_tokenizer):
    """The decoder strips the leading space of what it decodes: a window that starts at a space
    ('▁') must keep it (decoding the new token alone would drop every space)."""
    tok = byte_fallback_tokenizer
    ids = tok.encode("Hello a a", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["▁", "H", "e", "l", "l", "o", "▁", "<0x61>", "▁", "<0x61>"]
    texts = [d.text for d in texts_as_pushed(full_decoder(tok), ids)]
    assert texts[:2] == ["", "H"] and texts[-4:] == ["Hello ", "Hello a", "Hello a ", "Hello a a"]


def controller(control: dict, decode, **sampling) -> ChoiceController:
    ctrl = resolve_control(control, ControlConfig(), ["positive", "concise"])
    return ChoiceController(0, ctrl, SamplingParams(**sampling), 5, 4096, {0}, decode, seed=0)


@pytest.mark.parametrize("stop, before", [("n fox j", "The quick brow"), ("🙂", "I am happy "),
                                          ("y 🙂 y", "I am happ")])
def test_a_stop_string_across_tokens_ends_the_answer_where_it_starts(smollm2_tokenizer, stop, before):
    tok = smollm2_tokenizer
    text = "The quick brown fox jumps." if "fox" in stop else "I am happy 🙂 yes, very happy."
    ids = tok.encode(text, add_special_tokens=False)
    ctl = controller({"mode": "none"}, full_decoder(tok), max_tokens=100, stop=[stop])
    pushed = 0
    for t in ids:
        pushed += 1
        if ctl.push(0, t):
            break
    assert ctl.finish_reason == "stop" and ctl.text == before
    assert len(tok.decode(ids[:pushed])) > len(before) + len(stop) - 2  # it ended on the token that completed the stop
    assert ctl.take_delta(["positive", "concise"]).text == before


class CountingDecode:
    """A decode (one character per id) that counts the ids it was given."""

    def __init__(self):
        self.ids = 0

    def __call__(self, ids: list[int]) -> str:
        self.ids += len(ids)
        return "".join(chr(96 + t % 26) for t in ids)


@pytest.mark.parametrize("control", [{"mode": "none"},
                                     {"mode": "block", "num_candidates": 2, "block_size": 4}])
def test_a_choice_decodes_each_token_a_bounded_number_of_times(control):
    """Decoding work grows with the answer's length, not its square (it re-decoded the whole
    answer at every token: 45,150 ids for 300 tokens)."""
    decode = CountingDecode()
    ctl = controller(control, decode, max_tokens=300)
    step = 0
    while not ctl.finished:
        for k in range(ctl.K):
            while not ctl.candidates[k].done:
                step += 1
                ctl.push(k, step)
        if not ctl.streaming:
            ctl.select(torch.zeros(ctl.K, 2), torch.tensor([0.0, 1.0]))
    assert len(ctl.accepted) == 300 and ctl.text == CountingDecode()(ctl.accepted)
    assert decode.ids <= 4 * ctl.tokens_generated


def test_candidates_fork_from_one_state_without_changing_it():
    """Block candidates continue one accepted state: pushing onto it makes new states and leaves it
    (and each other) alone, even in the middle of a character. Ids are UTF-8 bytes: "€" is E2 82 AC."""
    decode = lambda ids: bytes(ids).decode(errors="replace")
    accepted = Detokenizer(decode).push(ord("a")).push(0xE2)  # "a" and a third of "€"
    assert (accepted.final, accepted.text) == ("a", "a" + REPLACEMENT)
    half = accepted.push(0x82)  # still unfinished
    assert (half.final, half.text) == ("a", decode([ord("a"), 0xE2, 0x82]))
    assert half.push(0xAC).text == "a€"
    assert accepted.push(0x82).push(0xAC).text == "a€"  # a second candidate on the same path
    other = accepted.push(ord("b"))
    assert other.text == decode([ord("a"), 0xE2, ord("b")]) and other.push(ord("!")).text == other.text + "!"
    assert (accepted.final, accepted.text) == ("a", "a" + REPLACEMENT)  # unchanged
