"""The server-side scorer's prompt-prefix cache: same values and caches as full passes, fewer
tokens read when requests share a context, bounded by tokens."""

from __future__ import annotations

import random

import pytest
import torch

from cdserve.backends.scorer_prefix_cache import PREFIX_BLOCK, ScorerPrefixCache, block_hashes
from cdserve.backends.scorer_runner import ScorerRunner
from prefix_scorers.checkpoint import DEFAULT_HEADS, random_scorer

VOCAB = 64


@pytest.fixture(scope="module")
def scorer():
    return random_scorer(VOCAB, None, DEFAULT_HEADS[:2], hidden_size=32, num_layers=2).eval()


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


CONTEXT = _tokens(2 * PREFIX_BLOCK + 5, 0)  # a shared context of two whole blocks and a bit


def test_block_hashes_name_whole_block_prefixes():
    a, b = CONTEXT + [1, 2, 3], CONTEXT[:PREFIX_BLOCK] + [9] * PREFIX_BLOCK
    assert len(block_hashes(a)) == 2 and len(block_hashes(CONTEXT[: PREFIX_BLOCK - 1])) == 0
    assert block_hashes(a)[0] == block_hashes(b)[0] and block_hashes(a)[1] != block_hashes(b)[1]


def test_final_values_equal_a_full_pass_and_read_only_the_tail(scorer):
    cached, plain = ScorerRunner(scorer, torch.device("cpu"), 4096), ScorerRunner(scorer, torch.device("cpu"))
    for seed in range(1, 4):  # three requests sharing CONTEXT, each its own question and answer
        prompt, output = CONTEXT + _tokens(7, seed), _tokens(9, 100 + seed)
        torch.testing.assert_close(cached.final_values(prompt, output), plain.final_values(prompt, output),
                                   rtol=1e-5, atol=1e-5)
    full = len(CONTEXT) + 7 + 8  # prompt + output but the last token
    assert plain.read_tokens == 3 * full
    # the first request reads everything; the others start after the context's two whole blocks
    assert cached.read_tokens == full + 2 * (full - 2 * PREFIX_BLOCK)
    assert cached.prefixes.hit_tokens == 2 * 2 * PREFIX_BLOCK


def test_prefill_from_the_cache_equals_a_full_prefill(scorer):
    cached, plain = ScorerRunner(scorer, torch.device("cpu"), 4096), ScorerRunner(scorer, torch.device("cpu"))
    cached.prefill(CONTEXT + [5, 6])  # fills the cache
    for prompt in (CONTEXT + _tokens(11, 7), CONTEXT[: 2 * PREFIX_BLOCK + 1]):  # a tail; nothing to read
        a, b = cached.prefill(prompt), plain.prefill(prompt)
        assert a.length == b.length == len(prompt) - 1 and bool(a.mask.all())
        for ka, kb in zip(a.keys + a.values, b.keys + b.values):
            torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
    assert cached.read_tokens == len(CONTEXT) + 1 + (len(CONTEXT) + 10 - 2 * PREFIX_BLOCK)


def test_a_cached_prefix_is_never_changed_by_its_users(scorer):
    runner = ScorerRunner(scorer, torch.device("cpu"), 4096)
    prompt = CONTEXT + [1]
    runner.final_values(prompt, [2, 3])
    before, _ = runner.prefixes.longest(prompt, len(prompt))
    snapshot = [k.clone() for k in before.keys]
    for seed in range(3):
        runner.final_values(CONTEXT + _tokens(5, seed), _tokens(4, seed))
    after, _ = runner.prefixes.longest(prompt, len(prompt))
    for k, s in zip(after.keys, snapshot):
        torch.testing.assert_close(k, s, rtol=0, atol=0)


def test_bounded_by_tokens_least_recently_used_out(scorer):
    runner = ScorerRunner(scorer, torch.device("cpu"), 4 * PREFIX_BLOCK)
    a, b, c = (_tokens(2 * PREFIX_BLOCK + 1, s) for s in (11, 12, 13))
    for p in (a, b):
        runner.prefill(p)
    runner.prefixes.longest(a, len(a))  # a used last: b goes first
    runner.prefill(c)
    cache = runner.prefixes
    assert len(cache) == 2
    assert cache.longest(a, len(a))[1] == 2 * PREFIX_BLOCK and cache.longest(b, len(b))[1] == 0
    assert cache.longest(c, len(c))[1] == 2 * PREFIX_BLOCK


def test_zero_tokens_turns_it_off(scorer):
    runner = ScorerRunner(scorer, torch.device("cpu"), 0)
    runner.final_values(CONTEXT, [1, 2])
    runner.final_values(CONTEXT, [1, 2])
    assert len(runner.prefixes) == 0 and runner.read_tokens == 2 * (len(CONTEXT) + 1)


def test_a_hash_collision_is_not_a_hit():
    cache = ScorerPrefixCache(4096)
    keys = [torch.zeros(1, 2, PREFIX_BLOCK, 4)]
    from prefix_scorers.kv_cache import KVCache

    cache.store(list(range(PREFIX_BLOCK)), KVCache(keys, keys, torch.ones(1, PREFIX_BLOCK, dtype=torch.bool)))
    entry_key = next(iter(cache._entries))
    other = [1] * PREFIX_BLOCK
    cache._index[block_hashes(other)[0]] = entry_key  # pretend the other prompt's hash collides
    assert cache.longest(other, len(other)) == (None, 0)


def test_a_prefix_already_held_by_a_longer_entry_is_not_stored_again(scorer):
    runner = ScorerRunner(scorer, torch.device("cpu"), 4096)
    long = _tokens(3 * PREFIX_BLOCK + 1, 21)
    runner.prefill(long)  # keeps its 3 whole blocks
    runner.prefill(long[: 2 * PREFIX_BLOCK + 1])  # its first 2 blocks: already held
    assert len(runner.prefixes) == 1 and runner.prefixes._tokens == 3 * PREFIX_BLOCK
