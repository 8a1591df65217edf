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

from dataclasses import dataclass, field

import torch

from cdserve.backends.vllm.block_fork import FORK_KEY, GROUP_KEY
from cdserve.control.steering import best_of_n_kl_bound, select_candidate
from cdserve.outputs import ChoiceDelta, ControlValues, GenerationRequest
from prefix_scorers.kv_cache import KVCache


@dataclass
class ScorerPrefix:
    """The scorer's view of the accepted prefix: a cache of all its tokens but the last."""

    cache: KVCache
    last: int


@dataclass
class Scored:
    raw: torch.Tensor  # (K, H) raw values of each candidate at its last token
    combined: torch.Tensor  # (K,)
    forked: KVCache  # K rows: the prefix plus each candidate but its last token


@dataclass
class ChoiceState:
    accepted: list[int] = field(default_factory=list)  # tokens kept, EOS included
    kl: float = 0.0
    selections: int = 0
    tokens_generated: int = 0


class BlockDecoder:
    def __init__(self, engine):
        self.engine = engine

    # -- scoring (runs in a worker thread: plain torch) ----------------------------------------
    @torch.inference_mode()
    def prefix(self, prompt: list[int]) -> ScorerPrefix:
        return ScorerPrefix(self.engine.scorer.prefill(prompt), prompt[-1])

    @torch.inference_mode()
    def score(self, prefix: ScorerPrefix, candidates: list[list[int]], gen_start: int,
              weights: tuple[float, ...]) -> Scored:
        """Value each candidate (a list of >= 1 tokens) at its last token, read at the position
        before it: the scorer reads [last prefix token] + candidate[:-1] on K forks of the cache."""
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
        q_last = q[torch.arange(K), at]  # (K, H, d_e)
        taken = torch.tensor([[c[-1]] for c in candidates])
        raw = runner.values_at(q_last, taken)[:, :, 0].float()  # (K, H)
        pos = gen_start + at  # index of each candidate's last token in the answer
        w = torch.tensor([weights] * K, dtype=torch.float32)
        return Scored(raw, runner.combine(raw, pos, w).float(), forked)

    # -- one choice ------------------------------------------------------------------------------
    async def run_choice(self, request: GenerationRequest, choice: int, emit) -> None:
        eng, ctrl, sp = self.engine, request.control, request.sampling
        K = ctrl.num_candidates
        block = ctrl.block_size if ctrl.mode == "block" else sp.max_tokens
        prompt = request.prompt_token_ids
        budget = min(sp.max_tokens, eng.max_model_len - len(prompt))
        seed = sp.seed if sp.seed is not None else int(torch.randint(2**62, (1,)))
        chooser = torch.Generator().manual_seed((seed * 1_000_003 + choice) % 2**63)
        prefix = await eng.in_scorer_thread(self.prefix, prompt)
        state = ChoiceState()
        step = 0
        while True:
            max_tokens = min(block, budget - len(state.accepted))
            group = f"{request.request_id}-{choice}-b{step}"
            params = eng.sampling_params(request, choice, n=K, max_tokens=max_tokens,
                                         seed=None if sp.seed is None else (seed + 7919 * choice + K * step) % 2**63,
                                         output_kind=_final_only(), extra_args=fork_args(
                                             group, K if step > 0 else 0, last=max_tokens >= budget - len(state.accepted)))
            outs = None
            async for out in eng.llm.generate({"prompt_token_ids": prompt + state.accepted}, params, group):
                outs = out
            cands = sorted(outs.outputs, key=lambda o: o.index)
            tokens = [list(o.token_ids) for o in cands]
            scored = await eng.in_scorer_thread(self.score, prefix, tokens, len(state.accepted), ctrl.weights)
            w = select_candidate(scored.combined, ctrl.selection, ctrl.strength, chooser)
            win = cands[w]
            state.accepted += tokens[w]
            state.selections += 1
            state.kl += best_of_n_kl_bound(K)
            state.tokens_generated += sum(len(t) for t in tokens)
            step += 1
            ended = win.finish_reason == "stop" or len(state.accepted) >= budget
            delta = ChoiceDelta(choice, win.text, [t for t in tokens[w] if t not in eng.eos_token_ids])
            if ended:
                delta.finish_reason = win.finish_reason if win.finish_reason == "stop" else "length"
                delta.control = ControlValues(ctrl.mode, dict(zip(eng.head_names, scored.raw[w].tolist())),
                                              float(scored.combined[w]), state.kl, state.selections,
                                              state.tokens_generated)
                emit(delta)
                return
            emit(delta)
            prefix = ScorerPrefix(scored.forked.select(torch.tensor([w])), tokens[w][-1])


def fork_args(group: str, forks: int, last: bool) -> dict | None:
    """extra_args for block_fork.py: keep this block's candidates unless it is the answer's last
    (none can be continued); after the first block, its `forks` requests fork from the winner."""
    args = {**({} if last else {GROUP_KEY: group}), **({FORK_KEY: forks} if forks else {})}
    return args or None


def _final_only():
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind.FINAL_ONLY
