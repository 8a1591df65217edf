"""ScorerRows: vLLM's batch bookkeeping mirrored for the scorer, without vLLM (pure torch)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")  # the package imports vllm's logits-processor interface

from cdserve.backends.vllm.scorer_rows import MAX_FINISHED, ScorerRows, TokenControl, parse_control
from prefix_scorers.checkpoint import DEFAULT_HEADS, random_scorer

V = 64


@pytest.fixture(scope="module")
def scorer():
    return random_scorer(V, None, DEFAULT_HEADS[:2], hidden_size=32, num_layers=2, seed=0)


def ctrl(key: str) -> TokenControl:
    return TokenControl(key=key, weights=(1.0, 0.0), strength=1.0, top_k=5, temperature=0.0)


def reference(scorer, seq: list[int]) -> torch.Tensor:
    return scorer(torch.tensor([seq])).queries[0, -1]  # (H, d_e): full recompute


def check(rows: ScorerRows, scorer, seqs: dict[int, list[int]]) -> None:
    for index, seq in seqs.items():
        row = rows.by_index[index]
        torch.testing.assert_close(rows.queries[row.slot], reference(scorer, seq), atol=1e-4, rtol=1e-4)


def test_incremental_queries_match_full_recompute_through_adds_moves_and_removes(scorer):
    rows = ScorerRows(scorer, torch.device("cpu"))
    outs = {0: [], 1: [], 2: []}
    prompts = {0: [1, 2, 3], 1: [4, 5, 6, 7, 8], 2: [9]}
    for i in range(3):
        rows.add(i, ctrl(f"k{i}"), prompts[i], outs[i])
    rows.sync()
    check(rows, scorer, {i: prompts[i] for i in range(3)})
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        for o in outs.values():
            o.append(int(torch.randint(V, (1,), generator=g)))
        if step == 2:  # request 1 leaves: vLLM may only say so by moving the last one onto it
            rows.move(2, 1, swap=False)
            assert "k1" in rows.finished
            prompts[1], outs[1] = prompts.pop(2), outs.pop(2)
        if step == 3:  # a newcomer with outputs already (a preempted request coming back)
            outs[2] = [11, 12]
            prompts[2] = [13, 14]
            rows.add(2, ctrl("k9"), prompts[2], outs[2])
        if step == 4:
            rows.move(0, 2, swap=True)
            prompts[0], prompts[2] = prompts[2], prompts[0]
            outs[0], outs[2] = outs[2], outs[0]
        rows.sync()
        check(rows, scorer, {i: prompts[i] + outs[i] for i in outs})
    assert len(rows.slots) == 3 and rows.kv.batch_size == 3


def test_rows_without_token_mode_cost_nothing_and_removal_frees_everything(scorer):
    rows = ScorerRows(scorer, torch.device("cpu"))
    rows.add(0, None, [1, 2], [])
    assert len(rows) == 0
    rows.add(1, ctrl("a"), [1, 2], [])
    rows.sync()
    rows.by_index[1].kl.append(torch.tensor(0.5))
    rows.remove(1)
    rows.end_update()
    assert len(rows) == 0 and rows.kv.batch_size == 0 and rows.slots == []
    assert rows.kl_of("a", 1) == pytest.approx(0.5)  # kept until the server fetched it
    assert len(rows.finished) == 0


def test_forgotten_and_unfetched_results_stay_bounded(scorer):
    rows = ScorerRows(scorer, torch.device("cpu"))
    for i in range(MAX_FINISHED + 50):
        rows.add(0, ctrl(f"k{i}"), [1], [])
        rows.move(1, 0, swap=False)  # replaced by a (plain) request moved onto its index
    assert len(rows.finished) == MAX_FINISHED
    rows.add(0, ctrl("gone"), [1], [])
    rows.forget(["gone"])
    rows.remove(0)
    assert "gone" not in rows.finished


@pytest.mark.parametrize("spec, message", [
    ({"mode": "token", "weights": [1.0], "strength": 1.0, "top_k": 5}, "one weight per scorer head"),
    ({"mode": "token", "weights": [1.0, float("nan")], "strength": 1.0, "top_k": 5}, "finite"),
    ({"mode": "token", "weights": [1.0, 0.0], "strength": -1.0, "top_k": 5}, "strength"),
    ({"mode": "token", "weights": [1.0, 0.0], "strength": 1.0, "top_k": -2}, "top_k"),
    ({"mode": "token", "weights": [1.0, 0.0], "strength": 1.0, "top_k": 5, "tail": "base"}, "tail"),
    ({"mode": "token", "weights": [1.0, 0.0], "strength": 1.0, "top_k": 5, "plausibility": 1.0}, "plausibility"),
])
def test_parse_control_names_the_bad_field(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_control({"cdserve": spec}, num_heads=2, temperature=0.0)


def test_parse_control_ignores_other_modes():
    assert parse_control(None, 2, 0.0) is None
    assert parse_control({"cdserve": {"mode": "block"}}, 2, 0.0) is None
    c = parse_control({"cdserve": {"mode": "token", "weights": [1, 0], "strength": 2, "top_k": 0, "key": "x"}}, 2, 0.7)
    assert c == TokenControl("x", (1.0, 0.0), 2.0, 0, 0.7)
    c = parse_control({"cdserve": {"mode": "token", "weights": [1, 0], "strength": 2, "top_k": 5, "tail": "keep"}}, 2, 0.7)
    assert c.keep_tail and not parse_control({"cdserve": {"mode": "token", "weights": [1, 0], "strength": 2,
                                                          "top_k": 5}}, 2, 0.7).keep_tail
    c = parse_control({"cdserve": {"mode": "token", "weights": [1, 0], "strength": 2, "top_k": 5, "plausibility": 0.05,
                                   "unheld": [2, 0]}}, 2, 0.7)
    assert c.plausibility == 0.05 and c.unheld == (2, 0)


def test_measure_only_rows_keep_kl_without_scorer_state(scorer):
    """Unsteered requests with top_p < 1 only measure KL: no scorer slot; block candidates, which
    share one key, keep their results by key and tokens."""
    from cdserve.backends.vllm.scorer_rows import ScorerRows, parse_control, result_key

    spec = {"cdserve": {"mode": "block", "key": "g", "measure": True, "by_output": True}}
    control = parse_control(spec, 4, 0.8, 0.5)
    assert control is not None and not control.steer and control.by_output
    assert parse_control({"cdserve": {"mode": "none", "key": "k"}}, 4, 0.8, 0.5) is None
    rows = ScorerRows(scorer, torch.device("cpu"))
    outs = [[5, 6], [7]]
    for i, out in enumerate(outs):
        rows.add(i, control, [1, 2, 3], out)
    rows.sync()
    assert rows.slots == [] and rows.controlled(2) == [] and [i for i, _ in rows.measured(2)] == [0, 1]
    for i, out in enumerate(outs):
        rows.by_index[i].kl = [torch.tensor(0.5)] * len(out)
    rows.remove(0)
    rows.remove(1)
    assert rows.kl_of(result_key("g", [5, 6]), 2) == 1.0
    rows.forget([result_key("g", [7])])
    assert not rows.finished


def test_rows_sharing_a_context_read_it_once(scorer):
    """A shared context (whole PREFIX_BLOCK blocks) is read by the scorer once: rows arriving
    together and rows arriving later copy it from a live row, and every row's queries still match a
    full recompute, through later steps and after the first reader has left."""
    from cdserve.backends.vllm.scorer_rows import PREFIX_BLOCK

    g = torch.Generator().manual_seed(3)
    context = [int(t) for t in torch.randint(V, (2 * PREFIX_BLOCK + 5,), generator=g)]
    rows = ScorerRows(scorer, torch.device("cpu"))
    prompts = {i: context + [i + 1] * (i + 2) for i in range(3)}  # 2 whole blocks shared
    prompts[3] = [7, 8, 9]  # nothing shared
    outs = {i: [] for i in prompts}
    for i, prompt in prompts.items():
        rows.add(i, ctrl(f"k{i}"), prompt, outs[i])
    rows.sync()
    assert rows.reused_tokens == 2 * 2 * PREFIX_BLOCK  # rows 1 and 2 copied both blocks from row 0
    assert rows.prefill_tokens == sum(len(p) for p in prompts.values()) - rows.reused_tokens
    check(rows, scorer, prompts)
    for step in range(3):
        for o in outs.values():
            o.append(int(torch.randint(V, (1,), generator=g)))
        if step == 1:  # the first reader leaves; a newcomer copies from one of the others
            rows.remove(0)
            del prompts[0], outs[0]
            prompts[4], outs[4] = context[:PREFIX_BLOCK + 3], [1, 2]
            rows.add(4, ctrl("k4"), prompts[4], outs[4])
        rows.sync()
        check(rows, scorer, {i: prompts[i] + outs[i] for i in outs})
    assert rows.reused_tokens == 5 * PREFIX_BLOCK


def test_steps_joins_and_leaves_write_in_place(scorer):
    """The scorer cache is the hf engine's KVRows: once it has room, decode steps, a row leaving
    and a row joining write into the same buffers (no whole-cache copy per step, which cost more
    than the scorer's forward at 64 rows with a 512-token context), and queries stay exact."""
    g = torch.Generator().manual_seed(5)
    rows = ScorerRows(scorer, torch.device("cpu"))
    prompts = {i: [int(t) for t in torch.randint(V, (4 + i,), generator=g)] for i in range(4)}
    outs = {i: [] for i in prompts}
    for i, prompt in prompts.items():
        rows.add(i, ctrl(f"k{i}"), prompt, outs[i])
    rows.sync()
    rows.kv._reserve(8, 0, 16)  # room for what follows
    buffer, reallocations = rows.kv.k[0].data_ptr(), rows.kv.reallocations
    for step in range(6):
        for o in outs.values():
            o.append(int(torch.randint(V, (1,), generator=g)))
        if step == 2:
            rows.remove(1)
            del prompts[1], outs[1]
        if step == 3:
            prompts[1], outs[1] = [3, 1, 4], [1]
            rows.add(1, ctrl("new"), prompts[1], outs[1])
        rows.sync()
        check(rows, scorer, {i: prompts[i] + outs[i] for i in outs})
    assert rows.kv.k[0].data_ptr() == buffer and rows.kv.reallocations == reallocations


def test_a_shared_context_is_kept_once_and_attended_once_per_group(scorer):
    """Rows sharing a context keep only their own tokens in the cache (the context's keys/values
    are one SharedPrefix, the first reader's copy dropped too), so a step reads the context once;
    queries match a full recompute through steps, a second context, and the first reader leaving."""
    from cdserve.backends.vllm.scorer_rows import PREFIX_BLOCK

    g = torch.Generator().manual_seed(7)
    contexts = [[int(t) for t in torch.randint(V, (2 * PREFIX_BLOCK,), generator=g)] for _ in range(2)]
    rows = ScorerRows(scorer, torch.device("cpu"))
    prompts = {i: contexts[i % 2] + [i + 1] * (3 + i) for i in range(5)}
    prompts[5] = [7, 8, 9]  # nothing shared
    outs = {i: [] for i in prompts}
    for i, prompt in prompts.items():
        rows.add(i, ctrl(f"k{i}"), prompt, outs[i])
    rows.sync()
    check(rows, scorer, prompts)
    own = {i: len(p) - (2 * PREFIX_BLOCK if i < 5 else 0) for i, p in prompts.items()}
    assert rows.kv.length == max(own.values()) < 2 * PREFIX_BLOCK
    assert {i: int(rows.kv.mask[r.slot].sum()) for i, r in rows.by_index.items()} == own
    assert len({id(rows.by_index[i].shared) for i in range(5)}) == 2 and rows.by_index[5].shared is None
    for step in range(4):
        for o in outs.values():
            o.append(int(torch.randint(V, (1,), generator=g)))
        if step == 1:  # the first reader leaves; a newcomer still finds the context
            rows.remove(0)
            del prompts[0], outs[0]
            prompts[6], outs[6] = contexts[0] + [5], [6]
            rows.add(6, ctrl("k6"), prompts[6], outs[6])
        rows.sync()
        check(rows, scorer, {i: prompts[i] + outs[i] for i in outs})
    assert rows.kv.length < 2 * PREFIX_BLOCK
    assert rows.by_index[6].shared is rows.by_index[2].shared
