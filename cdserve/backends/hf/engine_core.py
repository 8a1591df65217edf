"""The hf engine's step loop: schedule, decode, score, steer, sample, postprocess.

Each step decodes one token for every row of the batch (batch.py). New requests join at the next
step when the scheduler (scheduler.py) lets them (their prompt is prefilled once, then copied into
n x K rows); finished and aborted requests leave at once. Token mode runs one scorer step for all
controlled rows together, then steers their logits (steer_step.py, with the vLLM worker's code).
What a token means for its choice (stops, blocks, values, deltas) is the ChoiceController's
business, shared with the vLLM engine; choices that wait for a selection are advanced by
selection.py.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, wait

import torch

from cdserve.backends.hf.batch import Batch
from cdserve.backends.hf.model_runner import ModelRunner
from cdserve.backends.hf.scheduler import Scheduler
from cdserve.backends.hf.selection import Selection
from cdserve.backends.hf.sequence import Choice, RequestState, Row
from cdserve.backends.hf.steer_step import (
    sample_rows,
    segment_ends,
    steer_and_measure,
    taken_values,
)
from cdserve.backends.scorer_runner import ScorerRunner
from cdserve.config import EngineConfig
from cdserve.control.choice import ChoiceController
from cdserve.outputs import StepStats
from cdserve.rewards import RewardService


class EngineCore:
    def __init__(self, runner: ModelRunner, scorer: ScorerRunner, tokenizer, config: EngineConfig,
                 heads: list[str], eos_token_ids: set[int], max_model_len: int, rewards: RewardService):
        self.runner, self.scorer, self.tokenizer, self.config = runner, scorer, tokenizer, config
        self.heads, self.eos, self.max_model_len = heads, eos_token_ids, max_model_len
        self.device = runner.device
        self.scheduler = Scheduler(config.max_batch_rows)
        self.batch = Batch(runner, scorer)
        self.selection = Selection(scorer, rewards)
        self.master = torch.Generator().manual_seed(config.seed)

    @property
    def rows(self) -> list[Row]:
        """The batch's rows, in batch order."""
        return self.batch.rows

    # -- requests in and out (thread-safe entry points; admission checks are the engine's) ---------
    def submit(self, state: RequestState) -> None:
        self.scheduler.submit(state)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return bool(self.rows) or self.scheduler.has_work()

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> StepStats | None:
        """One token for every row: schedule, decode, score, steer, sample, postprocess.

        Host syncs left (on a GPU each waits for the device):
        - after sampling, the one transfer of the sampled ids with the segment ends and KL terms:
          stops, EOS, blocks and detokenising are host work;
        - the per-step inputs built from host lists (tokens, valid flags, temperatures, top-p, row
          indices): host-to-device copies, not overlapped with the device's work;
        - when a choice selects a block or finishes: its taken values and combined values (.cpu()),
          which the selection and the response read on the host;
        - when rows join, fork or leave: the prompt ids and the fork / move index lists.
        No KV-cache operation reads the device: a step writes one column in place and dead columns
        are trimmed from host bookkeeping (kv_manager.py)."""
        start = time.perf_counter()
        prefill_tokens = self._schedule()
        if self._all_await_rewards():
            return None
        batch, scorer = self.batch, self.scorer.scorer
        tokens, valid = batch.decode_inputs()
        logits = self.runner.decode(tokens, valid)  # (B, V) base model
        ends = segment_ends(batch.rows, logits)  # (B,) block candidates that end before this token
        scorer_start = time.perf_counter()
        queries = batch.scorer_step(tokens, valid)  # (Bc, H*E, d_e) scorer, controlled rows only
        kl = steer_and_measure(scorer, batch.rows, batch.controlled, logits, queries, self.eos)  # token rows in place; (B,)
        scorer_seconds = time.perf_counter() - scorer_start
        batch.unread_last(ends)  # an ended candidate's input token is read again by the next block
        tokens = sample_rows(batch.rows, logits)  # (B,)
        scorer_start = time.perf_counter()
        taken = taken_values(scorer, batch.controlled, tokens, queries)  # values of the sampled tokens, on the device
        scorer_seconds = scorer_seconds + time.perf_counter() - scorer_start if queries is not None else 0.0
        # The step's one host sync: stops, blocks and detokenising need the ids (float64 holds ids exactly).
        sampled, ended, kls = torch.stack([tokens.double(), ends.double(), kl.double()]).tolist()
        sampling_rows = sum(not r.waiting for r in batch.rows)  # candidates waiting for selection idle
        candidates = self._postprocess([int(t) for t in sampled], taken, kls, ended)
        return StepStats(batch_rows=sampling_rows, step_seconds=time.perf_counter() - start,
                         scorer_seconds=scorer_seconds, prefill_tokens=prefill_tokens,
                         candidates_generated=candidates)

    # -- admission (scheduler.py decides who joins) ----------------------------------------------------
    def _schedule(self) -> int:
        """Aborts leave, then the waiting requests that fit join; returns the prompt tokens prefilled."""
        aborted = self.scheduler.drain()
        if aborted:
            running = {id(r.choice.request): r.choice.request for r in self.rows
                       if r.choice.request.gen.request_id in aborted}
            for state in running.values():
                for choice in state.choices:
                    choice.ctl.abort()
                self._emit(state.choices)
                for choice in state.choices:
                    for r in choice.rows:
                        r.leave()
            self.batch.apply_row_events()
        tokens = 0
        for state in self.scheduler.schedule(len(self.rows)):
            self.batch.join(state, self._new_rows(state))  # prefilled once for n x K rows
            tokens += len(state.gen.prompt_token_ids)
        return tokens

    def _new_rows(self, state: RequestState) -> list[Row]:
        gen = state.gen
        seed = gen.sampling.seed
        if seed is None:
            seed = int(torch.randint(2**62, (1,), generator=self.master))
        rows = []
        for c in range(gen.sampling.n):
            ctl = ChoiceController(c, gen.control, gen.sampling, len(gen.prompt_token_ids), self.max_model_len,
                                   self.eos, self._decode, seed)
            choice = Choice(request=state, ctl=ctl)
            for k in range(ctl.K):
                j = c * ctl.K + k
                g = torch.Generator(device=self.device).manual_seed((seed * 1_000_003 + j) % 2**63)
                choice.rows.append(Row(choice=choice, k=k, generator=g, last_token=gen.prompt_token_ids[-1]))
            state.choices.append(choice)
            rows.extend(choice.rows)
        return rows

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- after sampling ---------------------------------------------------------------------------
    def _postprocess(self, sampled: list[int], taken: dict[int, torch.Tensor], kl: list[float],
                     ended: list[float]) -> int:
        candidates = 0
        touched: dict[int, Choice] = {}
        for i, row in enumerate(self.rows):
            touched[id(row.choice)] = row.choice  # a waiting choice may select: its rewards came back
            if row.waiting:
                continue
            ctl = row.ctl
            if ended[i]:  # its block ends before this token (segment entropy): the token is dropped
                ctl.end_block(row.k)
                row.done()
                continue
            candidates += not ctl.streaming
            if i in taken:
                row.last_values = taken[i]
            row.last_token = sampled[i]
            if ctl.push(row.k, sampled[i], kl[i]) and not ctl.streaming:
                row.done()
        self._advance_all(touched.values())
        return candidates

    def _advance_all(self, choices) -> None:
        for choice in choices:
            self.selection.advance(choice)
        self._emit(choices)
        for row in self.rows:
            if row.ctl.finished or row.ctl.candidates[row.k].pruned:
                row.leave()
        self.batch.apply_row_events()

    def _all_await_rewards(self) -> bool:
        """True when there is nothing to decode: no rows, or every row waits for its request's
        rewards (then wait for one to come back, rather than decode placeholders)."""
        if not self.rows:
            return True
        if not all(r.waiting for r in self.rows):
            return False
        choices = {id(r.choice): r.choice for r in self.rows}.values()
        pending = [f for c in choices for f in (c.rewards or {}).values()]
        wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
        self._advance_all(list(choices))
        return not self.rows or all(r.waiting for r in self.rows)

    def _emit(self, choices) -> None:
        """Send each request the new output of its choices."""
        by_request: dict[int, tuple[RequestState, list]] = {}
        for choice in choices:
            delta = choice.ctl.take_delta(self.heads)
            if delta is not None:
                by_request.setdefault(id(choice.request), (choice.request, []))[1].append(delta)
        for state, deltas in by_request.values():
            state.sink(state.output(deltas))

    def fail_all(self, error: BaseException) -> None:
        """A step raised: every request in flight gets the error; the batch starts empty."""
        states = {id(r.choice.request): r.choice.request for r in self.rows}
        for state in list(states.values()) + self.scheduler.clear():
            state.sink(error)
        self.batch.clear()  # the step may have failed half-way through a row operation
