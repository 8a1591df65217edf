"""KVRows (kv_manager.py) against the index_select reference (prefix_scorers.kv_cache.KVCache):
rows added, stepped, forked and removed in a random order hold the same keys, values and mask,
with the dead leading columns trimmed the same way; and the operations copy only the rows they
concern (no reallocation of the whole batch per step, removal moves at most one row per hole)."""

from __future__ import annotations

import random

import torch

from cdserve.backends.hf.kv_manager import KVRows
from prefix_scorers.kv_cache import KVCache

LAYERS, HEADS, DIM = 2, 2, 3


def prompt(P: int, gen: torch.Generator):
    keys = [torch.randn(1, HEADS, P, DIM, generator=gen) for _ in range(LAYERS)]
    values = [torch.randn(1, HEADS, P, DIM, generator=gen) for _ in range(LAYERS)]
    return keys, values, torch.ones(1, P, dtype=torch.bool)


def ref_step(ref: KVCache, kv: KVRows, valid: torch.Tensor, gen: torch.Generator) -> None:
    """One decode column for every row, written to both."""
    kv.stage(valid[:, None])
    ref.mask = torch.cat([ref.mask, valid[:, None]], 1)
    for layer in range(LAYERS):
        k = torch.randn(len(valid), HEADS, 1, DIM, generator=gen)
        v = torch.randn(len(valid), HEADS, 1, DIM, generator=gen)
        kv.append(layer, k, v)
        ref.append(layer, k, v)
    kv.commit()


def assert_same(kv: KVRows, ref: KVCache, exact_trim: bool) -> None:
    """Same rows, same mask, same keys/values where the mask is set. The window is trimmed as the
    reference's (exact_trim) or longer by leading columns no row uses: the trim reads host
    bookkeeping, which does not see placeholder columns that became the oldest."""
    assert kv.batch_size == ref.batch_size
    if ref.batch_size == 0:
        return
    extra = kv.length - ref.length
    assert extra == 0 if exact_trim else extra >= 0
    assert not kv.mask[:, :extra].any()
    assert torch.equal(kv.mask[:, extra:], ref.mask)
    for layer in range(LAYERS):
        m = ref.mask[:, None, :, None].expand_as(ref.keys[layer])
        assert torch.equal(kv.keys(layer)[:, :, extra:][m], ref.keys[layer][m])
        assert torch.equal(kv.values(layer)[:, :, extra:][m], ref.values[layer][m])


def test_random_row_operations_match_the_index_select_reference():
    rnd, gen = random.Random(0), torch.Generator().manual_seed(0)
    for trial in range(12):
        placeholders = trial % 2 == 1  # some steps feed placeholders (rows waiting for a selection)
        kv, ref = KVRows(LAYERS), KVCache.empty(LAYERS)
        for _ in range(50):
            op = rnd.choice(["add", "step", "step", "step", "fork", "remove"])
            B = kv.batch_size
            if op == "add" or B == 0:
                P, copies = rnd.choice([0, 1, 3, 8, 20, 70]), rnd.randint(1, 3)
                keys, values, mask = prompt(P, gen)
                kv.add(keys, values, mask, copies)
                one = KVCache(keys, values, mask).select(torch.zeros(copies, dtype=torch.long))
                ref = ref.extend(one) if ref.batch_size else one
                if P == 0 and ref.mask.shape[1] == 0:  # the reference has no columns yet either
                    ref.keys, ref.values = [k[:, :, :0] for k in keys], [v[:, :, :0] for v in values]
                    ref.keys = [k.expand(copies, -1, -1, -1) for k in ref.keys]
                    ref.values = [v.expand(copies, -1, -1, -1) for v in ref.values]
            elif op == "step":
                ref_step(ref, kv, torch.tensor([not placeholders or rnd.random() < 0.8 for _ in range(B)]), gen)
            elif op == "fork":
                dst = rnd.sample(range(B), rnd.randint(1, B))
                src = [rnd.randrange(B) for _ in dst]
                kv.fork(dst, src)
                rows = list(range(B))
                for d, s in zip(dst, src):
                    rows[d] = s
                ref = ref.select(torch.tensor(rows))
            else:
                gone = rnd.sample(range(B), rnd.randint(1, B))
                order = kv.remove(gone)
                assert sorted(order) == [i for i in range(B) if i not in gone]
                ref = ref.select(torch.tensor(order, dtype=torch.long)) if order else KVCache.empty(LAYERS)
            assert_same(kv, ref, exact_trim=not placeholders)


def test_steps_write_in_place_and_removal_moves_only_rows_into_holes():
    gen = torch.Generator().manual_seed(1)
    kv = KVRows(LAYERS)
    for P in (5, 9, 2, 7, 4, 6):
        kv.add(*prompt(P, gen), 1)
    buffers = kv.k[0].data_ptr()
    for _ in range(40):
        kv.stage(torch.ones(6, 1, dtype=torch.bool))
        for layer in range(LAYERS):
            kv.append(layer, torch.randn(6, HEADS, 1, DIM, generator=gen), torch.randn(6, HEADS, 1, DIM, generator=gen))
        kv.commit()
    assert kv.reallocations <= 1  # 49 columns: at most one doubling of the 64 first allocated
    buffers = kv.k[0].data_ptr()
    before = [kv.keys(0)[i].clone() for i in range(6)]
    order = kv.remove([1, 4])
    assert order == [0, 5, 2, 3]  # the last row moved into the first hole; the others stayed put
    assert kv.k[0].data_ptr() == buffers  # no new buffer: nothing but row 5 was copied
    for i, j in enumerate(order):
        assert torch.equal(kv.keys(0)[i], before[j][:, -kv.length:])


def test_dead_columns_are_trimmed_when_the_longest_row_leaves_without_reading_the_device():
    gen = torch.Generator().manual_seed(2)
    kv = KVRows(LAYERS)
    kv.add(*prompt(30, gen), 1)
    kv.add(*prompt(4, gen), 2)
    assert kv.length == 30
    kv.remove([0])
    assert kv.length == 4 and kv.mask.all()  # bookkeeping on the host knew the 26 columns were dead
    kv.add(*prompt(10, gen), 1)  # a longer prompt grows the window to the left, padding the others
    assert kv.length == 10 and kv.mask.sum(1).tolist() == [4, 4, 10]
