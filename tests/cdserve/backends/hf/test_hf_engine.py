"""The hf engine on a tiny real Llama (random weights, SmolLM2's tokenizer) and a random scorer:
exactness of strength 0, the steered distribution, block/best-of-N selection, batch invariance,
joining and leaving the batch."""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import pytest
import torch

from cdserve.backends.hf.engine import HFEngine
from cdserve.backends.hf.sequence import RequestState
from cdserve.config import EngineConfig
from cdserve.control.request import resolve_control
from cdserve.outputs import GenerationRequest
from cdserve.sampling import SamplingParams
from prefix_scorers.base_model import load_model
from prefix_scorers.checkpoint import load_scorer

_ids = itertools.count()


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_scorer_dir):
    eng = HFEngine(EngineConfig(model=str(tiny_model_dir), scorer=str(tiny_scorer_dir), backend="hf",
                                device="cpu", max_batch_rows=64, max_model_len=512, max_tokens_limit=256))
    asyncio.run(eng.start())  # loads; the loop thread outlives this event loop (it only uses queues)
    yield eng
    asyncio.run(eng.shutdown())


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_scorer_dir, engine):
    """The tiny base model and scorer, loaded separately, for recomputing what the engine did."""
    model = load_model(tiny_model_dir)
    scorer = load_scorer(tiny_scorer_dir, engine.tokenizer, model.get_input_embeddings().weight)
    return model, scorer


PROMPTS = ["The weather today is", "Tell me about cats.", "Once upon a time", "I think that"]


def prompt_ids(engine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def request(engine, text, control, **sampling) -> GenerationRequest:
    ctrl = resolve_control(control, engine.config.control, engine.head_names, engine.rewards.names())
    return GenerationRequest(request_id=f"t{next(_ids)}", prompt_token_ids=prompt_ids(engine, text),
                             sampling=SamplingParams(**sampling), control=ctrl)


async def collect(engine, req: GenerationRequest) -> list[dict]:
    """Run one request to the end: per choice, its token ids, text, finish reason and values."""
    choices: dict[int, dict] = {}
    async for out in engine.generate(req):
        for d in out.choices:
            c = choices.setdefault(d.index, {"ids": [], "text": "", "finish": None, "control": None})
            c["ids"] += d.token_ids
            c["text"] += d.text
            c["finish"] = d.finish_reason or c["finish"]
            c["control"] = d.control or c["control"]
    return [choices[i] for i in sorted(choices)]


def run(engine, *reqs: GenerationRequest) -> list[list[dict]]:
    async def main():
        return await asyncio.gather(*(collect(engine, r) for r in reqs))
    return asyncio.run(main())


def single(engine, req: GenerationRequest) -> dict:
    """The one choice of one request run alone."""
    (choice,), = run(engine, req)
    return choice


# -- strength 0 is plain decoding --------------------------------------------------------------
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 7},
                                      {"temperature": 0.8, "top_p": 0.9, "seed": 11}])
@pytest.mark.parametrize("vocabulary", [{"top_k": 0}, {"top_k": 5, "tail": "keep"}])  # every token, unsteered
def test_strength_zero_over_every_token_equals_plain_decoding(engine, sampling, vocabulary):
    plain = request(engine, PROMPTS[0], {"mode": "none"}, max_tokens=24, **sampling)
    steered = request(engine, PROMPTS[0], {"mode": "token", "strength": 0.0, **vocabulary,
                                           "weights": {"positive": 3.0, "specific": -2.0}}, max_tokens=24, **sampling)
    a, b = single(engine, plain), single(engine, steered)
    assert len(a["ids"]) > 0
    assert a["ids"] == b["ids"] and a["text"] == b["text"]
    # Both report the same KL to the base: 0, or top-p truncation's own (sum of -log kept mass).
    assert b["control"].kl == pytest.approx(a["control"].kl, abs=1e-5)
    if sampling.get("top_p", 1.0) < 1.0:
        assert a["control"].kl > 0.01
    else:
        assert a["control"].kl == 0.0


# -- the steered distribution ------------------------------------------------------------------
def expected_first_token_distribution(reference, ids, weights, strength, top_k):
    model, scorer = reference
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        q = scorer.score(torch.tensor([ids]))[0, -1]  # (H, V); identity normalisation
    combined = (torch.tensor(weights)[:, None] * q).sum(0)
    top = logits.topk(top_k).indices
    p = torch.softmax(logits[top] + strength * combined[top], dim=0)
    return top.tolist(), p


def test_token_mode_samples_the_steered_distribution(engine, reference):
    """Empirical first-token frequencies over 2,400 seeded draws match
    softmax(logits + strength * sum_h w_h Q_h) over the top-k: chi-square p > 0.001."""
    from scipy.stats import chisquare

    control = {"mode": "token", "weights": {"positive": 1.0, "concise": -0.5}, "strength": 0.5, "top_k": 5}
    ids = prompt_ids(engine, PROMPTS[1])
    top, p = expected_first_token_distribution(reference, ids, [1.0, 0.0, -0.5, 0.0], 0.5, 5)
    assert p.max() < 0.9, "the test needs a non-degenerate distribution"
    reqs = [request(engine, PROMPTS[1], control, max_tokens=1, temperature=1.0, n=16, seed=s) for s in range(150)]
    eos = engine.tokenizer.eos_token_id
    counts = dict.fromkeys(top, 0)
    for choices in run(engine, *reqs):
        for c in choices:
            tok = c["ids"][0] if c["ids"] else eos
            assert tok in counts, "token mode sampled outside the top-k"
            counts[tok] += 1
    n = sum(counts.values())
    observed = [counts[t] for t in top]
    expected = (p.double() / p.double().sum() * n).tolist()
    assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


def test_plausibility_reaches_the_steering_and_its_reported_kl(engine, reference):
    """control.plausibility: the first step's reported KL is that of the held steering, top-k
    tokens under plausibility x the top token's probability valued at most the base-expected value."""
    model, scorer = reference
    ids = prompt_ids(engine, PROMPTS[1])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        q = scorer.score(torch.tensor([ids]))[0, -1]  # (H, V); identity normalisation
    combined = q[0]  # positive alone
    top = logits.topk(20).indices
    base = torch.softmax(logits[top], 0)
    assert not torch.isin(top, torch.tensor(sorted(engine.core.eos))).any()  # never held: not in play here
    held = torch.where(base >= 0.2 * base.max(), combined[top], combined[top].clamp(max=float((base * combined[top]).sum())))

    def kl(values):  # KL(steered || base) at temperature 1 over the vocabulary: the top 20 only
        steered = torch.log_softmax(logits[top] + 4.0 * values, 0)
        return float((steered.exp() * (steered - torch.log_softmax(logits, 0)[top])).sum())

    assert abs(kl(held) - kl(combined[top])) > 1e-3, "the test needs a token the hold changes"
    for plausibility, values in ((0.2, held), (0.0, combined[top])):
        control = {"mode": "token", "weights": {"positive": 1.0}, "strength": 4.0, "top_k": 20,
                   "plausibility": plausibility}
        got = single(engine, request(engine, PROMPTS[1], control, max_tokens=1, temperature=1.0, seed=0))
        assert got["control"].kl == pytest.approx(kl(values), rel=1e-3, abs=1e-4)


def test_the_models_end_of_sequence_ids_reach_the_token_step_unheld(engine, monkeypatch):
    """control.plausibility never holds the end-of-sequence ids (steering.hold_implausible): the
    engine hands them to the shared token step."""
    from cdserve.backends.hf import steer_step

    seen, steer = [], steer_step.steer_in_place
    monkeypatch.setattr(steer_step, "steer_in_place", lambda s, lg, rows: seen.append(rows.unheld) or steer(s, lg, rows))
    single(engine, request(engine, PROMPTS[1], {"mode": "token", "plausibility": 0.05}, max_tokens=2, temperature=0.0))
    assert seen and all(u == tuple(sorted(engine.core.eos)) and u for u in seen)


def test_scaling_weights_equals_scaling_strength(engine):
    a = request(engine, PROMPTS[2], {"mode": "token", "weights": {"positive": 2.0, "readable": 1.0},
                                     "strength": 1.0}, max_tokens=20, temperature=1.0, seed=5)
    b = request(engine, PROMPTS[2], {"mode": "token", "weights": {"positive": 1.0, "readable": 0.5},
                                     "strength": 2.0}, max_tokens=20, temperature=1.0, seed=5)
    (x,), (y,) = run(engine, a, b)  # together in one batch
    assert x["ids"] == y["ids"]
    assert x["control"].combined == pytest.approx(2 * y["control"].combined, rel=1e-4)


def test_strength_changes_the_output(engine):
    outs = {}
    for s in (0.0, 20.0):
        outs[s] = single(engine, request(engine, PROMPTS[3], {"mode": "token", "weights": {"positive": 1.0},
                                                               "strength": s}, max_tokens=16, temperature=0.0))
    assert outs[0.0]["ids"] != outs[20.0]["ids"]
    assert outs[20.0]["control"].kl > 0


# -- block and best-of-N pick the scorer's argmax ----------------------------------------------
def recomputed_value(reference, engine, prompt, cand_ids, weights):
    """Value of a finished candidate by a full scorer pass: read at the position before its last
    token, at that token; combined with identity normalisation."""
    _, scorer = reference
    ids = torch.tensor([prompt + cand_ids])
    with torch.no_grad():
        q = scorer.score(ids)[0, len(prompt) + len(cand_ids) - 2]  # (H, V)
    raw = q[:, cand_ids[-1]]
    return float((torch.tensor(weights) * raw).sum()), raw


@pytest.mark.parametrize("mode, extra, max_tokens", [
    ("block", {"block_size": 6}, 6),  # one block: the output is the chosen candidate
    ("best_of_n", {}, 10),
])
def test_selection_picks_the_argmax_of_recomputed_values(engine, reference, mode, extra, max_tokens):
    K, seed, weights = 4, 3, {"positive": 1.0, "concise": 0.5}
    sel = request(engine, PROMPTS[0], {"mode": mode, "num_candidates": K, "weights": weights, **extra},
                  max_tokens=max_tokens, temperature=1.0, seed=seed)
    # Candidate j of a choice draws from the generator of row j: a plain request with n=K and the
    # same seed reproduces the K candidates exactly.
    plain = request(engine, PROMPTS[0], {"mode": "none"}, max_tokens=max_tokens, temperature=1.0, seed=seed, n=K)
    [chosen], candidates = run(engine, sel, plain)
    eos = engine.tokenizer.eos_token_id
    prompt = prompt_ids(engine, PROMPTS[0])
    w = [1.0, 0.0, 0.5, 0.0]
    scored = []
    for c in candidates:
        ids = c["ids"] + ([eos] if c["finish"] == "stop" else [])
        scored.append(recomputed_value(reference, engine, prompt, ids, w))
    values = [v for v, _ in scored]
    assert len({round(v, 4) for v in values}) > 1, "candidates should differ"
    best = max(range(K), key=values.__getitem__)
    assert chosen["ids"] == candidates[best]["ids"]
    assert chosen["control"].combined == pytest.approx(values[best], abs=1e-4)
    assert list(chosen["control"].values.values()) == pytest.approx(scored[best][1].tolist(), abs=1e-4)
    assert chosen["control"].selections == 1
    assert chosen["control"].kl == pytest.approx(math.log(K) - (K - 1) / K)
    assert chosen["control"].tokens_generated == sum(len(c["ids"]) + (c["finish"] == "stop") for c in candidates)


def test_best_of_n_with_the_reward_in_the_loop_is_client_side_true_reward_best_of_n(engine):
    """best_of_n ranking by a reward alone (weights {}) keeps the answer a client would keep by
    sampling the same K answers (n=K, same seed) and ranking them with the reward itself."""
    from prefix_scorers.rewards import get_reward

    K, seed = 4, 5
    sel = request(engine, PROMPTS[3], {"mode": "best_of_n", "num_candidates": K, "weights": {},
                                       "rewards": {"readable": 1.0}}, max_tokens=12, temperature=1.0, seed=seed)
    plain = request(engine, PROMPTS[3], {"mode": "none"}, max_tokens=12, temperature=1.0, seed=seed, n=K)
    [chosen], candidates = run(engine, sel, plain)
    scores = get_reward("readable")([c["text"] for c in candidates])
    assert len(set(scores)) > 1, "the candidates should score differently"
    best = max(range(K), key=scores.__getitem__)
    assert chosen["ids"] == candidates[best]["ids"]
    assert chosen["control"].rewards == {"readable": pytest.approx(scores[best])}


def test_rows_waiting_for_a_reward_draw_no_random_numbers(tiny_model_dir, tiny_scorer_dir):
    """While a slow reward call runs, other requests keep the batch stepping; the waiting rows must
    not draw from their generators, or a seeded answer would depend on the reward's latency.
    Pruned best-of-N by the reward alone then ends on one of the plain samples of the same seed."""
    from prefix_scorers.rewards import get_reward, register_reward
    from prefix_scorers.rewards.registry import _REGISTRY

    readable = get_reward("readable")

    def slow_readable(texts):
        time.sleep(0.3)
        return readable(texts)

    register_reward("slow_readable", slow_readable, replace=True)
    eng = HFEngine(EngineConfig(model=str(tiny_model_dir), scorer=str(tiny_scorer_dir), backend="hf", device="cpu",
                                max_batch_rows=64, max_model_len=512, max_tokens_limit=256))
    asyncio.run(eng.start())
    try:
        K, seed = 4, 5
        pruned = request(eng, PROMPTS[3], {"mode": "best_of_n", "num_candidates": K, "weights": {},
                                           "rewards": {"slow_readable": 1.0}, "prune_every": 4,
                                           "keep_fraction": 0.5}, max_tokens=12, temperature=1.0, seed=seed)
        busy = request(eng, PROMPTS[0], {"mode": "none"}, max_tokens=256, temperature=1.0, seed=1)
        [chosen], _ = run(eng, pruned, busy)
        plain = run(eng, request(eng, PROMPTS[3], {"mode": "none"}, max_tokens=12, temperature=1.0,
                                 seed=seed, n=K))[0]
        assert chosen["ids"] in [c["ids"] for c in plain]
    finally:
        asyncio.run(eng.shutdown())
        _REGISTRY.pop("slow_readable", None)


def test_a_failing_reward_fails_only_its_request(tiny_model_dir, tiny_scorer_dir):
    import http.server
    import threading

    from cdserve.errors import InvalidRequestError

    class Broken(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    eng = HFEngine(EngineConfig(model=str(tiny_model_dir), scorer=str(tiny_scorer_dir), backend="hf", device="cpu",
                                rewards={"http": {"judge": f"http://127.0.0.1:{httpd.server_port}/score"}}))
    asyncio.run(eng.start())
    try:
        bad = request(eng, PROMPTS[0], {"mode": "block", "num_candidates": 2, "block_size": 4,
                                        "rewards": {"judge": 1.0}}, max_tokens=8, temperature=1.0, seed=1)
        good = request(eng, PROMPTS[1], {"mode": "block", "num_candidates": 2, "block_size": 4}, max_tokens=8,
                       temperature=1.0, seed=1)

        async def main():
            return await asyncio.gather(collect(eng, bad), collect(eng, good), return_exceptions=True)

        failed, ok = asyncio.run(main())
        assert isinstance(failed, InvalidRequestError) and failed.status_code == 502
        assert failed.param == "control.rewards.judge" and "judge" in failed.message
        assert ok[0]["finish"] == "length" and len(ok[0]["ids"]) == 8
        for _ in range(100):  # the failed request's rows leave within the engine's next steps
            if not eng.core.rows:
                break
            time.sleep(0.05)
        assert eng.core.rows == []
    finally:
        asyncio.run(eng.shutdown())
        httpd.shutdown()


def test_block_mode_runs_several_blocks(engine):
    c = single(engine, request(engine, PROMPTS[2], {"mode": "block", "block_size": 4, "num_candidates": 3},
                               max_tokens=16, temperature=1.0, seed=1))
    assert c["control"].selections == math.ceil(len(c["ids"]) / 4) or c["finish"] == "stop"
    assert c["control"].tokens_generated >= len(c["ids"])


def test_pruned_best_of_n_leaves_the_batch_as_it_prunes_and_streams_the_survivor(engine):
    req = request(engine, PROMPTS[1], {"mode": "best_of_n", "num_candidates": 4, "prune_every": 4,
                                       "keep_fraction": 0.5}, max_tokens=16, temperature=1.0, seed=3)
    outputs, steps = [], []
    engine.add_stats_listener(steps.append)

    def ours():  # from the step that prefilled this request: the previous test's last step may
        # reach the listener after that test's final output, so after this test added it
        return steps[next((i for i, s in enumerate(steps) if s.prefill_tokens), len(steps)):]

    async def main():
        async for out in engine.generate(req):
            outputs.append(out)

    try:
        asyncio.run(main())
        for _ in range(100):  # the last step's stats reach listeners right after its output
            if not engine.core.rows and len(ours()) >= 16:
                break
            time.sleep(0.02)
    finally:
        engine._listeners.remove(steps.append)
    texts = [d.text for out in outputs for d in out.choices if d.text]
    final = outputs[-1].choices[-1]
    assert final.finish_reason == "length"
    assert len(texts) > 1  # the last survivor streamed after the second pruning point
    # 4 candidates sample 4 tokens each, the 2 kept 4 more each, the survivor 8 more; pruned rows left
    assert final.control.tokens_generated == 4 * 4 + 2 * 4 + 8 and final.control.selections == 2
    assert final.control.kl == pytest.approx(math.log(4))
    assert [s.batch_rows for s in ours()] == [4] * 4 + [2] * 4 + [1] * 8


# -- batch invariance --------------------------------------------------------------------------
def test_batch_invariance_across_modes(engine):
    controls = [{"mode": "none"},
                {"mode": "token", "weights": {"positive": 1.0}, "strength": 5.0},
                {"mode": "token", "weights": {"concise": 2.0, "specific": -1.0}, "strength": 3.0, "top_k": 0},
                {"mode": "block", "block_size": 3, "num_candidates": 2},
                {"mode": "best_of_n", "num_candidates": 3, "weights": {"readable": 1.0}}]

    def reqs():
        return [request(engine, PROMPTS[i % len(PROMPTS)], c, max_tokens=12, temperature=0.0)
                for i, c in enumerate(controls)]
    together = run(engine, *reqs())
    alone = [run(engine, r)[0] for r in reqs()]
    assert [[c["ids"] for c in t] for t in together] == [[c["ids"] for c in a] for a in alone]


def test_seeded_sampling_is_batch_invariant(engine):
    def make():
        return [request(engine, PROMPTS[i], {"mode": m}, max_tokens=12, temperature=1.0, seed=40 + i, n=2)
                for i, m in enumerate(["none", "token", "none", "token"])]
    together = run(engine, *make())
    alone = [run(engine, r)[0] for r in make()]
    assert [[c["ids"] for c in t] for t in together] == [[c["ids"] for c in a] for a in alone]


# -- stop strings, n, lengths ------------------------------------------------------------------
def test_stop_string_cuts_the_text(engine):
    full = single(engine, request(engine, PROMPTS[0], {"mode": "none"}, max_tokens=30, temperature=0.0))
    text = full["text"]
    assert len(text) > 12
    stop = text[8:11]
    cut = single(engine, request(engine, PROMPTS[0], {"mode": "none"}, max_tokens=30, temperature=0.0,
                                 stop=(stop,)))
    assert cut["finish"] == "stop"
    assert cut["text"] == text[: text.index(stop)]


def test_n_choices_and_length_finish(engine):
    [choices] = run(engine, request(engine, PROMPTS[1], {"mode": "token"}, max_tokens=5, temperature=1.0,
                                   seed=0, n=3))
    assert len(choices) == 3
    for c in choices:
        assert c["finish"] in ("length", "stop")
        assert len(c["ids"]) <= 5
        assert set(c["control"].values) == set(engine.head_names)


# -- joining and leaving the batch ---------------------------------------------------------------
def _state(engine, req, sink):
    return RequestState(gen=req, sink=sink)


def test_requests_join_at_the_next_step_and_aborts_leave_at_once(tiny_model_dir, tiny_scorer_dir):
    eng = HFEngine(EngineConfig(model=str(tiny_model_dir), scorer=str(tiny_scorer_dir), backend="hf", device="cpu"))
    eng.load_sync()  # drive the core by hand: no loop thread
    core, outs = eng.core, []
    a = request(eng, PROMPTS[0], {"mode": "token"}, max_tokens=50, temperature=1.0, seed=1)
    b = request(eng, PROMPTS[1], {"mode": "block", "num_candidates": 3, "block_size": 4}, max_tokens=50,
                temperature=1.0, seed=2)
    core.submit(_state(eng, a, outs.append))
    core.step()
    core.step()
    assert len(core.rows) == 1 and core.scorer.batch_size == 1
    core.submit(_state(eng, b, outs.append))
    core.step()  # b joins while a is mid-way
    assert len(core.rows) == 4 and core.scorer.batch_size == 4
    assert core.runner.batch_size == 4
    core.abort(a.request_id)
    core.step()
    assert len(core.rows) == 3 and core.scorer.batch_size == 3 and core.runner.batch_size == 3
    last_a = [o for o in outs if o.request_id == a.request_id][-1]
    assert last_a.finished and last_a.choices[0].finish_reason == "abort"
    core.abort(b.request_id)
    core.step()
    assert core.rows == [] and core.runner.batch_size == 0 and core.scorer.batch_size == 0
    assert not core.has_work()


def test_admission_refuses_before_any_work(tiny_model_dir, tiny_scorer_dir):
    """The hf engine applies the shared admission policy (cdserve/admission.py) in generate()."""
    from cdserve.engine_protocol import QueueFullError
    from cdserve.errors import InvalidRequestError

    eng = HFEngine(EngineConfig(model=str(tiny_model_dir), scorer=str(tiny_scorer_dir), backend="hf",
                                device="cpu", max_waiting=0, max_batch_rows=4, max_model_len=64,
                                max_tokens_limit=32, control={"max_num_candidates": 4}))
    eng.load_sync()  # no loop thread: nothing runs, so admission alone decides

    async def first(req):
        return await eng.generate(req).__anext__()

    long = GenerationRequest("long", list(range(100, 200)), SamplingParams(max_tokens=4),
                             resolve_control({}, eng.config.control, eng.head_names))
    with pytest.raises(InvalidRequestError) as e:
        asyncio.run(first(long))
    assert e.value.param == "prompt"
    wide = request(eng, PROMPTS[0], {"mode": "best_of_n", "num_candidates": 2}, max_tokens=4, n=3)
    with pytest.raises(InvalidRequestError) as e:
        asyncio.run(first(wide))
    assert e.value.param == "n"
    eng.admission.in_flight["busy"] = 4  # the batch is full; max_waiting=0: no room to wait
    with pytest.raises(QueueFullError):
        asyncio.run(first(request(eng, PROMPTS[0], {}, max_tokens=4)))
