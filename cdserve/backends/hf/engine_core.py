"""The hf engine's step loop: schedule, decode, score, steer, sample, postprocess.

Each step decodes one token for every row of the batch. New requests join at the next step when
the scheduler (scheduler.py) lets them (their prompt is prefilled once, then copied into n x K
rows); finished and aborted requests leave at once. Rows (sequence.py) record fork and leave
events; `_apply_row_events` hands them to both KV caches (kv_manager.py). Token mode runs one scorer step for all controlled rows together. What a token
means for its choice (stops, blocks, selection, values, deltas) is the ChoiceController's
business, shared with the vLLM engine.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, wait

import torch

from cdserve.backends.hf.model_runner import ModelRunner
from cdserve.backends.hf.sampler import sample
from cdserve.backends.hf.scheduler import Scheduler
from cdserve.backends.hf.sequence import Choice, RequestState, Row, RowState
from cdserve.backends.scorer_runner import ScorerRunner
from cdserve.backends.token_steering import TokenRows, steer_in_place
from cdserve.config import EngineConfig
from cdserve.control.choice import ChoiceController
from cdserve.control.segments import entropy_ends
from cdserve.control.steering import sampled_kl
from cdserve.errors import reward_failed
from cdserve.outputs import StepStats
from cdserve.rewards import RewardError, RewardService


class EngineCore:
    def __init__(self, runner: ModelRunner, scorer: ScorerRunner, tokenizer, config: EngineConfig,
                 heads: list[str], eos_token_ids: set[int], max_model_len: int, rewards: RewardService):
        self.runner, self.scorer, self.tokenizer, self.config = runner, scorer, tokenizer, config
        self.rewards = rewards
        self.heads, self.eos, self.max_model_len = heads, eos_token_ids, max_model_len
        self.device = runner.device
        self.scheduler = Scheduler(config.max_batch_rows)
        self.rows: list[Row] = []  # batch order: row i is row i of the base model's cache
        self.scored: list[Row] = []  # controlled rows in the scorer cache's row order
        self._ctrl: list[int] = []  # batch index of each scored row (see _reindex)
        self.master = torch.Generator().manual_seed(config.seed)

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
        tokens, valid = self._decode_inputs()
        sampling_rows = sum(not r.waiting for r in self.rows)  # candidates waiting for selection idle
        logits = self.runner.decode(tokens, valid)  # (B, V) base model
        scorer_start = time.perf_counter()
        queries = self._scorer_step(tokens, valid)  # (Bc, H, d_e) scorer, controlled rows only
        ends = self._segment_ends(logits)  # segment entropy: candidates that end before this token
        kl = self._steer_and_measure(logits, queries)  # token rows steered in place; (B,) KL(sampled || base)
        scorer_seconds = time.perf_counter() - scorer_start
        tokens = self._sample(logits)  # (B,)
        scorer_start = time.perf_counter()
        taken = self._taken_values(tokens, queries)  # the scorer's values of the sampled tokens, on the device
        scorer_seconds = scorer_seconds + time.perf_counter() - scorer_start if queries is not None else 0.0
        # The step's one host sync: stops, blocks and detokenising need the ids (float64 holds ids exactly).
        sampled, ended, kls = torch.stack([tokens.double(), ends.double(), kl.double()]).tolist()
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
            self._apply_row_events()
        tokens = 0
        for state in self.scheduler.schedule(len(self.rows)):
            prompt = state.gen.prompt_token_ids
            self.runner.add_rows(self.runner.prefill(prompt), state.num_rows)  # prefilled once for n x K rows
            rows = self._new_rows(state)
            if state.gen.control.mode != "none":
                self.scorer.add_rows(self.scorer.prefill(prompt), state.num_rows)
                self.scored.extend(rows)
            self.rows.extend(rows)
            tokens += len(prompt)
        if tokens:
            self._reindex()
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

    # -- per-step tensors -------------------------------------------------------------------------
    def _decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.tensor([r.last_token for r in self.rows], device=self.device)
        valid = torch.tensor([not r.waiting for r in self.rows], device=self.device)
        return tokens, valid

    def _controlled(self) -> list[int]:
        """Batch indices of controlled rows, in the scorer cache's row order."""
        return self._ctrl

    def _reindex(self) -> None:
        position = {id(r): i for i, r in enumerate(self.rows)}
        self._ctrl = [position[id(r)] for r in self.scored]

    def _sampling_tensors(self, idx: list[int] | None = None):
        rows = self.rows if idx is None else [self.rows[i] for i in idx]
        sps = [r.ctl.sampling for r in rows]
        temperature = torch.tensor([s.temperature for s in sps], device=self.device)
        top_p = torch.tensor([s.top_p for s in sps], device=self.device)
        return temperature, top_p, [r.generator for r in rows]

    def _scorer_step(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        idx = self._controlled()
        if not idx:
            return None
        sel = torch.tensor(idx, device=self.device)
        return self.scorer.step(tokens[sel], valid[sel])

    def _steer_and_measure(self, logits: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor:
        """Token-mode rows steered in place (token_steering.py, as the vLLM worker) and the per-token
        KL(sampled || base) (B,) of those and of rows that truncate by top_p (elsewhere 0): the
        control.kl contract (steering.sampled_kl). Pruned best-of-N reports log N alone, on both
        engines."""
        kl = torch.zeros(len(self.rows), device=self.device)
        pick = [] if queries is None else [(b, s) for s, b in enumerate(self._controlled())
                                           if self.rows[b].ctl.control.mode == "token" and not self.rows[b].waiting]
        if pick:
            rows = [self.rows[b] for b, _ in pick]
            ctrls = [r.ctl.control for r in rows]
            token_rows = TokenRows(
                index=[b for b, _ in pick], queries=queries[torch.tensor([s for _, s in pick], device=self.device)],
                weights=[c.weights for c in ctrls], strength=[c.strength for c in ctrls],
                top_k=[c.top_k for c in ctrls], risk=[c.risk for c in ctrls],
                positions=[r.gen_position for r in rows], temperature=[r.ctl.sampling.temperature for r in rows],
                top_p=[r.ctl.sampling.top_p for r in rows])
            kl[token_rows.index] = steer_in_place(self.scorer.scorer, logits, token_rows)
        idx = [i for i, r in enumerate(self.rows) if not r.waiting and r.ctl.control.mode != "token"
               and r.ctl.sampling.top_p < 1.0 and not r.ctl.pruning]
        if idx:
            sel = torch.tensor(idx, device=self.device)
            temperature, top_p, _ = self._sampling_tensors(idx)
            base = logits[sel]
            kl[idx] = sampled_kl(base, base, temperature, top_p, truncate=True).float()  # top-p truncation's KL
        return kl

    def _sample(self, steered: torch.Tensor) -> torch.Tensor:
        sps = [r.ctl.sampling for r in self.rows]  # the host knows what the device would be asked
        temperature, top_p, generators = self._sampling_tensors()
        # Waiting rows (for a selection or a reward call) draw nothing: a seeded answer must not
        # depend on how many steps the wait took.
        generators = [None if r.waiting else g for r, g in zip(self.rows, generators)]
        return sample(steered, temperature, top_p, generators, all_greedy=all(s.temperature == 0 for s in sps),
                      truncate=any(s.top_p < 1.0 for s in sps))

    def _segment_ends(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) bool on the device: rows whose candidate ends its block before the token sampled
        now (segment entropy, segments.py). Their input token is unread from both caches, so the
        next block reads it again as if this step had not run."""
        ends = torch.zeros(len(self.rows), dtype=torch.bool, device=self.device)
        idx = [i for i, r in enumerate(self.rows) if not r.waiting and r.ctl.control.segment == "entropy"
               and (r.ctl.control.mode == "block" or (r.ctl.pruning and not r.ctl.streaming))]
        if not idx:
            return ends
        sel = torch.tensor(idx, device=self.device)
        threshold = torch.tensor([self.rows[i].ctl.control.entropy_threshold for i in idx], device=self.device)
        taken = torch.tensor([self.rows[i].ctl.candidates[self.rows[i].k].grown for i in idx], device=self.device)
        ends = ends.index_copy(0, sel, entropy_ends(logits[sel], threshold, taken))
        self.runner.unread_last(ends)
        ctrl = self._controlled()  # block rows are controlled: each has a scorer row
        self.scorer.unread_last(ends[torch.tensor(ctrl, device=self.device)])
        return ends

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
            self._advance(choice)
        self._emit(choices)
        for row in self.rows:
            if row.ctl.finished or row.ctl.candidates[row.k].pruned:
                row.leave()
        self._apply_row_events()

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

    def _taken_values(self, tokens: torch.Tensor, queries: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """Raw member values (H*E,) of each controlled row's taken token (tokens (B,) on the
        device): the value of the prefix it completes. They stay on the device until a selection
        or a finished answer reads them."""
        if queries is None:
            return {}
        idx = self._controlled()
        toks = tokens[torch.tensor(idx, device=self.device)][:, None]  # (Bc, 1)
        vals = self.scorer.values_at(queries, toks)[:, :, 0].float()  # (Bc, H*E)
        return {b: vals[s] for s, b in enumerate(idx)}

    def _combine(self, raw: torch.Tensor, positions: list[int], ctl: ChoiceController) -> torch.Tensor:
        """Combined values (N,) of raw member values (N, H*E) at answer positions, with the
        request's risk."""
        pos = torch.tensor(positions, device=self.device)
        w = torch.tensor([ctl.control.weights] * len(positions), device=self.device, dtype=torch.float32)
        risk = torch.full((len(positions),), ctl.control.risk, device=self.device)
        return self.scorer.combine(raw.to(self.device), pos, w, risk).float().cpu()

    def _advance(self, choice: Choice) -> None:
        """Streaming choices: values once finished. Block/best_of_n: select when all K wait."""
        ctl = choice.ctl
        if ctl.streaming:
            if ctl.finished:
                row = next(r for r in choice.rows if not ctl.candidates[r.k].pruned)  # pruning's survivor
                raw = None if row.last_values is None else row.last_values.cpu()
                if raw is None:  # mode none kept no scorer state: one pass over the answer
                    raw = self.scorer.final_values(choice.request.gen.prompt_token_ids, ctl.taken()).float().cpu()
                values, spread = self.scorer.head_values(raw[None])
                ctl.set_values(values[0], float(self._combine(raw[None], [ctl.final_position()], ctl)[0]),
                               None if spread is None else spread[0])
            return
        if not ctl.waiting:
            return
        scores = self._reward_scores(choice)
        if scores is None:  # rewards still running (or failed): select at a later step
            return
        raw = torch.stack([r.last_values for r in choice.rows]).cpu()  # (K, H*E)
        values, spread = self.scorer.head_values(raw)
        w = ctl.select(values, self._combine(raw, ctl.value_positions(), ctl), scores, spread)
        if ctl.finished:
            return
        if w < 0:  # pruned best-of-N: the survivors go on from their own caches, the others leave
            for r in choice.rows:
                if r.state is RowState.FINISHED:  # pruned earlier: already out of the batch
                    continue
                if r.waiting and not ctl.candidates[r.k].done:
                    r.resume()
                elif not r.waiting and ctl.candidates[r.k].done:
                    r.done()
            return
        winner = choice.rows[w]
        for r in choice.rows:  # every candidate continues from the winner (caches forked in _apply_row_events)
            r.fork(winner)

    def _reward_scores(self, choice: Choice) -> dict[str, list[float]] | None:
        """The request's rewards of the waiting candidates: started off this thread on the first
        call, None until they are back; a failure ends that request alone (HTTP 502)."""
        ctl = choice.ctl
        if not ctl.control.rewards:
            return {}
        if choice.rewards is None:
            texts = ctl.reward_texts()
            choice.rewards = {name: self.rewards.submit(name, texts) for name, _ in ctl.control.rewards}
        if not all(f.done() for f in choice.rewards.values()):
            return None
        futures, choice.rewards = choice.rewards, None
        try:
            return {name: f.result() for name, f in futures.items()}
        except RewardError as e:
            self._fail(choice.request, reward_failed(e))
            return None

    def _fail(self, state: RequestState, error: BaseException) -> None:
        """One request fails (its rows leave with the others' next removal); the rest go on."""
        state.sink(error)
        for choice in state.choices:
            choice.ctl.fail()

    def _emit(self, choices) -> None:
        """Send each request the new output of its choices."""
        by_request: dict[int, tuple[RequestState, list]] = {}
        for choice in choices:
            delta = choice.ctl.take_delta(self.heads)
            if delta is not None:
                by_request.setdefault(id(choice.request), (choice.request, []))[1].append(delta)
        for state, deltas in by_request.values():
            state.sink(state.output(deltas))

    def _apply_row_events(self) -> None:
        """Hand the rows' fork and leave events (sequence.py) to both KV caches: forked rows copy
        their source's cache into their own slot, then the leaving rows' slots are filled by the
        last rows (the batch order changes the same way in `rows` and `scored`)."""
        forks = [(r, r.fork_src) for r in self.rows if r.fork_src is not None]
        if forks:
            position = {id(r): i for i, r in enumerate(self.rows)}
            self.runner.fork([position[id(d)] for d, _ in forks], [position[id(s)] for _, s in forks])
            scored = [(d, s) for d, s in forks if d.controlled]
            if scored:
                slot = {id(r): i for i, r in enumerate(self.scored)}
                self.scorer.fork([slot[id(d)] for d, _ in scored], [slot[id(s)] for _, s in scored])
            for d, _ in forks:
                d.fork_src = None
        leaving = [i for i, r in enumerate(self.rows) if r.state is RowState.FINISHED]
        if leaving:
            order = self.runner.remove(leaving)
            self.rows = [self.rows[j] for j in order]
            gone = [i for i, r in enumerate(self.scored) if r.state is RowState.FINISHED]
            if gone:
                order = self.scorer.remove(gone)
                self.scored = [self.scored[j] for j in order]
        if forks or leaving:
            self._reindex()

    def fail_all(self, error: BaseException) -> None:
        """A step raised: every request in flight gets the error; the batch starts empty."""
        states = {id(r.choice.request): r.choice.request for r in self.rows}
        for state in list(states.values()) + self.scheduler.clear():
            state.sink(error)
        for r in self.rows:
            r.leave()
        self.rows, self.scored, self._ctrl = [], [], []
        self.runner.kv.clear()  # the step may have failed half-way through a row operation
        self.scorer.kv.clear()
