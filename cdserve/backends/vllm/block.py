"""Block mode and best_of_n on vLLM: K candidates through `n=K`, scored here, one kept.

Block mode: ask vLLM for K continuations of M tokens of prompt + accepted (prefix caching keeps
the shared prefix's KV blocks, so only the newest tokens are recomputed), score each candidate
with the scorer, keep the argmax (or sample softmax(strength * value)), stream it, repeat until a
candidate that ends the answer is kept. best_of_n is one block as long as the whole answer.

Each candidate of the next block would recompute the accepted prefix's partial last KV block
(prefix caching reuses whole blocks only); block_fork.py copies it from the winner instead.

The scorer follows the accepted text with its own KV cache (one row, forked K ways per block),
so each block costs the scorer K x M incremental tokens, never a pass over the prefix.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from cdserve.backends.vllm.block_fork import FORK_KEY, GROUP_KEY
from cdserve.backends.vllm.scorer_rows import result_key
from cdserve.outputs import GenerationRequest
from prefix_scorers.kv_cache import KVCache


@dataclass
class ScorerPrefix:
    """The scorer's view of the accepted prefix: a cache of all its tokens but the last."""

    cache: KVCache
    last: int


@dataclass
class Scored:
    raw: torch.Tensor  # (K, H) raw values of each candidate at its last token (the ensemble mean)
    combined: torch.Tensor  # (K,), each head at mean + risk * spread
    spread: torch.Tensor | None  # (K, H) the ensemble's spread (None: a scorer without one)
    forked: KVCache  # K rows: the prefix plus each candidate but its last token


class BlockDecoder:
    def __init__(self, engine):
        self.engine = engine

    # -- scoring (runs in a worker thread: plain torch) ----------------------------------------
    @torch.inference_mode()
    def prefix(self, prompt: list[int]) -> ScorerPrefix:
        return ScorerPrefix(self.engine.scorer.prefill(prompt), prompt[-1])

    @torch.inference_mode()
    def score(self, prefix: ScorerPrefix, candidates: list[list[int]], value_positions: list[int],
              weights: tuple[float, ...], risk: float = 0.0) -> Scored:
        """Value each candidate (a list of >= 1 tokens) at its last token, read at the position
        before it: the scorer reads [last prefix token] + candidate[:-1] on K forks of the cache.
        value_positions: each candidate's last token's index in the answer (ChoiceController)."""
        runner = self.engine.scorer
        K, lengths = len(candidates), [len(c) for c in candidates]
        T = max(lengths)
        ids = torch.zeros(K, T, dtype=torch.long)
        valid = torch.zeros(K, T, dtype=torch.bool)
        for k, c in enumerate(candidates):  # right-padded: padding comes after every real token
            ids[k, : len(c)] = torch.tensor([prefix.last] + c[:-1])
            valid[k, : len(c)] = True
        forked = prefix.cache.select(torch.zeros(K, dtype=torch.long))
        start = forked.mask.sum(1, keepdim=True) if forked.length else torch.zeros(K, 1, dtype=torch.long)
        positions = start + torch.arange(T)  # (K, T)
        q = runner.scorer(ids, positions=positions, valid=valid, cache=forked).queries  # (K, T, H, d_e)
        at = torch.tensor(lengths) - 1
        q_last = q[torch.arange(K), at]  # (K, H*E, d_e)
        taken = torch.tensor([[c[-1]] for c in candidates])
        raw = runner.values_at(q_last, taken)[:, :, 0].float()  # (K, H*E)
        w = torch.tensor([weights] * K, dtype=torch.float32)
        combined = runner.combine(raw, torch.tensor(value_positions), w, torch.full((K,), risk)).float()
        values, spread = runner.head_values(raw)
        return Scored(values, combined, spread, forked)

    # -- one choice ------------------------------------------------------------------------------
    async def run_choice(self, request: GenerationRequest, choice: int, emit) -> None:
        """Blocks of K candidates from vLLM until the ChoiceController ends the answer; it checks
        each candidate (EOS, stop strings over the whole answer, length) and selects."""
        eng, ctrl, sp = self.engine, request.control, request.sampling
        prompt = request.prompt_token_ids
        seed = sp.seed if sp.seed is not None else int(torch.randint(2**62, (1,)))
        ctl = eng.controller(request, choice, seed)
        if ctl.pruning:
            return await self.run_pruned(request, choice, emit, ctl, seed)
        prefix = await eng.in_scorer_thread(self.prefix, prompt)
        step = 0
        while not ctl.finished:
            max_tokens = ctl.block_len
            group = f"{request.request_id}-{choice}-b{step}"
            extra = fork_args(group, ctl.K if step > 0 else 0, last=max_tokens >= ctl.budget - len(ctl.accepted))
            worker = {}
            if sp.top_p < 1.0:  # the worker measures each candidate's truncation KL, kept by its tokens
                worker = {"mode": ctrl.mode, "key": group, "measure": True, "by_output": True}
            if ctrl.segment == "entropy":  # the worker ends candidates before uncertain tokens
                worker = {"mode": ctrl.mode, **worker, **self._entropy_args(ctrl)}
            if worker:
                extra = {**(extra or {}), "cdserve": worker}
            params = eng.sampling_params(request, choice, n=ctl.K, max_tokens=max_tokens,
                                         seed=None if sp.seed is None else (seed + 7919 * choice + ctl.K * step) % 2**63,
                                         output_kind=_final_only(), extra_args=extra)
            outs = await self._final(prompt + ctl.accepted, params, group)
            for o in outs.outputs:
                self._take(ctl, o.index, o)
            if not ctl.waiting:
                raise RuntimeError(f"vLLM ended a block of {request.request_id} early: "
                                   f"{[(o.finish_reason, len(o.token_ids)) for o in outs.outputs]}")
            eng.count_candidates(sum(len(c.tokens) for c in ctl.candidates))
            tokens = [c.tokens for c in ctl.candidates]
            rewards = eng.submit_rewards(ctl)  # the rewards run while the scorer values the candidates
            scored = await eng.in_scorer_thread(self.score, prefix, tokens, ctl.value_positions(), ctrl.weights,
                                                ctrl.risk)
            w = ctl.select(scored.raw, scored.combined, await eng.reward_scores(rewards), scored.spread)
            if sp.top_p < 1.0:
                keys = {o.index: result_key(group, o.token_ids) for o in outs.outputs}
                ctl.kl += await eng.fetch_kl(keys.pop(w), len(tokens[w]), forget=list(keys.values()))
            delta = ctl.take_delta(eng.head_names)
            if delta is not None:
                emit(delta)
            prefix = ScorerPrefix(scored.forked.select(torch.tensor([w])), tokens[w][-1])
            step += 1


    async def run_pruned(self, request: GenerationRequest, choice: int, emit, ctl, seed: int) -> None:
        """Pruned best-of-N (speculative rejection): the N candidates run to the first pruning point
        as one request (n=N), the controller keeps the best, each survivor goes on as a request of
        its own to the next point; the last survivor streams."""
        eng, ctrl, sp = self.engine, request.control, request.sampling
        prompt, rid = request.prompt_token_ids, f"{request.request_id}-{choice}"
        prefix = await eng.in_scorer_thread(self.prefix, prompt)

        def params(n: int, key: int, max_tokens: int | None = None, **kw):
            return eng.sampling_params(request, choice, n=n, max_tokens=max_tokens or ctl.block_len,
                                       seed=None if sp.seed is None else (seed + 7919 * choice + 104729 * key) % 2**63,
                                       **kw)

        def to_next_point(n: int, key: int, max_tokens: int | None = None):  # stops at segment ends too
            entropy = {"cdserve": {"mode": ctrl.mode, **self._entropy_args(ctrl)}} if ctrl.segment == "entropy" else None
            return params(n, key, max_tokens, segments=True, extra_args=entropy, output_kind=_final_only())

        outs = await self._final(prompt, to_next_point(ctl.K, 0), f"{rid}-p0")
        self._push(ctl, [(o.index, o) for o in outs.outputs])
        step = 1
        while True:
            if not ctl.waiting:
                raise RuntimeError(f"vLLM ended a pruning segment of {request.request_id} early")
            rewards = eng.submit_rewards(ctl)
            scored = await eng.in_scorer_thread(self.score, prefix, [c.tokens for c in ctl.candidates],
                                                ctl.value_positions(), ctrl.weights, ctrl.risk)
            ctl.select(scored.raw, scored.combined, await eng.reward_scores(rewards), scored.spread)
            delta = ctl.take_delta(eng.head_names)
            if delta is not None:
                emit(delta)
            if ctl.finished:
                return
            if ctl.streaming:  # one survivor left: it streams to the end on what it accepted
                k = ctl.alive[0]
                return await eng.stream(request, choice, ctl, k, prompt + ctl.accepted,
                                        params(1, step * 64 + k, extra_args=None), emit)
            running = [k for k in ctl.alive if not ctl.candidates[k].done]
            outs = await asyncio.gather(*(self._final(prompt + ctl.candidates[k].tokens, to_next_point(
                1, step * 64 + k, ctl.candidate_len(k)), f"{rid}-p{step}-{k}") for k in running))
            self._push(ctl, [(k, out.outputs[0]) for k, out in zip(running, outs)])
            step += 1

    def _push(self, ctl, sampled: list[tuple[int, object]]) -> None:
        """Feed sampled candidates (vLLM CompletionOutputs) to the controller; count the tokens it
        kept (metrics)."""
        kept = 0
        for k, output in sampled:
            before = len(ctl.candidates[k].tokens)
            self._take(ctl, k, output)
            kept += len(ctl.candidates[k].tokens) - before
        self.engine.count_candidates(kept)

    def _take(self, ctl, k: int, output) -> None:
        """Candidate k's sampled tokens into the controller (tokens past its end are dropped); a
        segment end vLLM stopped it at (a sentence end, the entropy sentinel) ends its block."""
        ids, sentinel = list(output.token_ids), self.engine.segment_sentinel
        if output.stop_reason == sentinel and ids[-1:] == [sentinel]:
            ids.pop()  # an entropy segment end: the worker's sentinel, not a token of the answer
        ctl.push_all(k, ids)
        if not ctl.candidates[k].done and ctl.control.segment != "fixed" and output.finish_reason == "stop":
            ctl.end_block(k)

    def _entropy_args(self, ctrl) -> dict:
        """extra_args["cdserve"] entries that make the worker end candidates before uncertain tokens."""
        return {"entropy": {"threshold": ctrl.entropy_threshold, "sentinel": self.engine.segment_sentinel}}

    async def _final(self, prompt: list[int], params, request_id: str):
        """The last output of a FINAL_ONLY vLLM request."""
        out = None
        async for out in self.engine.llm.generate({"prompt_token_ids": prompt}, params, request_id):
            pass
        return out


def fork_args(group: str, forks: int, last: bool) -> dict | None:
    """extra_args for block_fork.py: keep this block's candidates unless it is the answer's last
    (none can be continued); after the first block, its `forks` requests fork from the winner."""
    args = {**({} if last else {GROUP_KEY: group}), **({FORK_KEY: forks} if forks else {})}
    return args or None


def _final_only():
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind.FINAL_ONLY
