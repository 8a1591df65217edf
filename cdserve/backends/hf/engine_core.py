"""The hf engine's step loop: admit, decode, score, steer, sample, postprocess.

Each step decodes one token for every row of the batch. New requests join at the next step
(their prompt is prefilled once, then forked into n x K rows); finished and aborted requests
leave at once. Token mode runs one scorer step for all controlled rows together.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque

import torch

from cdserve.backends.hf.model_runner import ModelRunner
from cdserve.backends.hf.sampler import sample
from cdserve.backends.hf.sequence import Choice, RequestState, Row
from cdserve.backends.scorer_runner import ScorerRunner, steer_rows
from cdserve.config import EngineConfig
from cdserve.control.steering import (
    best_of_n_kl_bound,
    kl_divergence,
    select_candidate,
)
from cdserve.engine_protocol import QueueFullError
from cdserve.errors import InvalidRequestError
from cdserve.outputs import ChoiceDelta, StepStats
from cdserve.text import find_stop, safe_prefix_len


class EngineCore:
    def __init__(self, runner: ModelRunner, scorer: ScorerRunner, tokenizer, config: EngineConfig,
                 heads: list[str], eos_token_ids: set[int], max_model_len: int):
        self.runner, self.scorer, self.tokenizer, self.config = runner, scorer, tokenizer, config
        self.heads, self.eos, self.max_model_len = heads, eos_token_ids, max_model_len
        self.device = runner.device
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # (request | request_id to abort)
        self.waiting: deque[RequestState] = deque()
        self.rows: list[Row] = []  # batch order: row i is row i of the base model's cache
        self.master = torch.Generator().manual_seed(config.seed)
        self.pending_count = 0  # submitted but not yet admitted (read by other threads)
        self._pending_lock = threading.Lock()

    # -- requests in and out (thread-safe entry points) -----------------------------------------
    def submit(self, state: RequestState) -> None:
        gen = state.gen
        if not gen.prompt_token_ids:
            raise InvalidRequestError("prompt", "the prompt is empty")
        if len(gen.prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError("prompt", f"the prompt has {len(gen.prompt_token_ids)} tokens; "
                                      f"this model's context is {self.max_model_len}", code="context_length_exceeded")
        if state.num_rows > self.config.max_batch_rows:
            raise InvalidRequestError("n", f"n x num_candidates = {state.num_rows} rows exceeds the "
                                      f"server's max_batch_rows={self.config.max_batch_rows}")
        with self._pending_lock:
            if self.pending_count >= self.config.max_waiting:
                raise QueueFullError(f"{self.pending_count} requests are waiting (max_waiting="
                                     f"{self.config.max_waiting}); retry later")
            self.pending_count += 1
        self.inbox.put(state)

    def _admitted(self, count: int = 1) -> None:
        with self._pending_lock:
            self.pending_count -= count

    def abort(self, request_id: str) -> None:
        self.inbox.put(request_id)

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting or not self.inbox.empty())

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> StepStats | None:
        start = time.perf_counter()
        self._drain_inbox()
        prefill_tokens = self._admit()
        if not self.rows:
            return None
        tokens, valid = self._decode_inputs()
        logits = self.runner.decode(tokens, valid)  # (B, V) base model
        scorer_start = time.perf_counter()
        queries = self._scorer_step(tokens, valid)  # (Bc, H, d_e) scorer, controlled rows only
        logits, kl = self._steer(logits, queries)  # token mode: logits + strength * sum_h w_h Q_h
        scorer_seconds = time.perf_counter() - scorer_start if queries is not None else 0.0
        sampled = sample(logits, *self._sampling_tensors())
        candidates = self._postprocess(sampled.tolist(), queries, kl)  # host sync: stops need ids
        return StepStats(batch_rows=len(tokens), step_seconds=time.perf_counter() - start,
                         scorer_seconds=scorer_seconds, prefill_tokens=prefill_tokens,
                         candidates_generated=candidates)

    # -- admission ----------------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        aborted = set()
        while not self.inbox.empty():
            item = self.inbox.get()
            if isinstance(item, str):
                aborted.add(item)
            else:
                self.waiting.append(item)
        if aborted:
            for state in [s for s in self.waiting if s.gen.request_id in aborted]:
                self.waiting.remove(state)
                self._admitted()
                state.sink(state.output([]))  # never admitted: finished with no choices
            running = {id(r.choice.request): r.choice.request for r in self.rows
                       if r.choice.request.gen.request_id in aborted}
            for state in running.values():
                self._finish_aborted(state)
            self._remove_rows(lambda r: r.choice.request.gen.request_id in aborted)

    def _finish_aborted(self, state: RequestState) -> None:
        """An aborted request ends with finish_reason 'abort' on its unfinished choices."""
        deltas = []
        for choice in state.choices:
            if not choice.finished:
                choice.finish_reason = "abort"
                deltas.append(ChoiceDelta(index=choice.index, text="", token_ids=[], finish_reason="abort",
                                          control=choice.control_values(self.heads)))
        state.sink(state.output(deltas))

    def _admit(self) -> int:
        tokens = 0
        while self.waiting and len(self.rows) + self.waiting[0].num_rows <= self.config.max_batch_rows:
            state = self.waiting.popleft()
            self._admitted()
            prompt = state.gen.prompt_token_ids
            cache, mask = self.runner.prefill(prompt)  # once, shared by all n x K rows
            self.runner.add_rows(cache, mask, state.num_rows)
            if state.gen.control.mode != "none":
                self.scorer.add_rows(self.scorer.prefill(prompt), state.num_rows)
            self.rows.extend(self._new_rows(state))
            tokens += len(prompt)
        return tokens

    def _new_rows(self, state: RequestState) -> list[Row]:
        seed = state.gen.sampling.seed
        if seed is None:
            seed = int(torch.randint(2**62, (1,), generator=self.master))
        state.selection_generator = torch.Generator().manual_seed(seed)
        rows = []
        for c in range(state.gen.sampling.n):
            choice = Choice(request=state, index=c)
            for k in range(state.gen.control.candidates):
                j = c * state.gen.control.candidates + k
                g = torch.Generator(device=self.device).manual_seed((seed * 1_000_003 + j) % 2**63)
                choice.rows.append(Row(choice=choice, generator=g, last_token=state.gen.prompt_token_ids[-1]))
            state.choices.append(choice)
            rows.extend(choice.rows)
        return rows

    # -- per-step tensors -------------------------------------------------------------------------
    def _decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.tensor([r.last_token for r in self.rows], device=self.device)
        valid = torch.tensor([not r.waiting for r in self.rows], device=self.device)
        return tokens, valid

    def _controlled(self) -> list[int]:
        """Batch indices of controlled rows, in the scorer cache's row order."""
        return [i for i, r in enumerate(self.rows) if r.controlled]

    def _sampling_tensors(self):
        sps = [r.choice.request.gen.sampling for r in self.rows]
        temperature = torch.tensor([s.temperature for s in sps], device=self.device)
        top_p = torch.tensor([s.top_p for s in sps], device=self.device)
        return temperature, top_p, [r.generator for r in self.rows]

    def _scorer_step(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        idx = self._controlled()
        if not idx:
            return None
        sel = torch.tensor(idx, device=self.device)
        return self.scorer.step(tokens[sel], valid[sel])

    def _steer(self, logits: torch.Tensor, queries: torch.Tensor | None):
        """Reweight the token-mode rows' logits; also return their per-row KL to the base."""
        if queries is None:
            return logits, None
        ctrl_idx = self._controlled()
        pick = [(b, s) for s, b in enumerate(ctrl_idx)
                if self.rows[b].choice.request.gen.control.mode == "token" and not self.rows[b].waiting]
        if not pick:
            return logits, None
        b_idx = torch.tensor([b for b, _ in pick], device=self.device)
        s_idx = torch.tensor([s for _, s in pick], device=self.device)
        ctrls = [self.rows[b].choice.request.gen.control for b, _ in pick]
        base = logits[b_idx]
        q = queries[s_idx]
        weights = torch.tensor([c.weights for c in ctrls], device=self.device, dtype=q.dtype)
        strength = torch.tensor([c.strength for c in ctrls], device=self.device, dtype=base.dtype)
        positions = torch.tensor([self.rows[b].gen_position for b, _ in pick], device=self.device)
        steered = steer_rows(self.scorer.scorer, base, q, weights, strength, [c.top_k for c in ctrls], positions)
        temperature = torch.tensor([self.rows[b].choice.request.gen.sampling.temperature for b, _ in pick],
                                   device=self.device)
        kl = kl_divergence(steered, base, temperature)
        logits = logits.index_copy(0, b_idx, steered)
        return logits, dict(zip((b for b, _ in pick), kl.tolist()))

    # -- after sampling ---------------------------------------------------------------------------
    def _postprocess(self, sampled: list[int], queries: torch.Tensor | None, kl: dict | None) -> int:
        taken = self._taken_values(sampled, queries)
        candidates = 0
        touched: dict[int, Choice] = {}
        for i, row in enumerate(self.rows):
            if row.waiting:
                continue
            row.sampled += 1
            candidates += row.choice.request.gen.control.candidates > 1
            if i in taken:
                row.last_values = taken[i]
            if kl is not None and i in kl:
                row.kl += kl[i]
            self._append(row, sampled[i])
            touched[id(row.choice)] = row.choice
        for choice in touched.values():
            self._advance(choice)
        forks = self._emit(touched.values())
        self._remove_rows(lambda r: r.choice.finished, forks)
        return candidates

    def _taken_values(self, sampled: list[int], queries: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """Raw per-head values (H,) of each controlled row's taken token: the value of the prefix
        it completes."""
        if queries is None:
            return {}
        idx = self._controlled()
        toks = torch.tensor([[sampled[b]] for b in idx], device=self.device)
        vals = self.scorer.values_at(queries, toks)[:, :, 0].float().cpu()  # (Bc, H)
        return {b: vals[s] for s, b in enumerate(idx)}

    def _append(self, row: Row, token: int) -> None:
        """Add one sampled token to a row and decide whether the row stops (eos, stop string,
        length) or reaches the end of its block."""
        choice, sp = row.choice, row.choice.request.gen.sampling
        ctrl = choice.request.gen.control
        row.last_token = token
        if token in self.eos:
            row.finish_reason = "stop"
        else:
            (row.pending if ctrl.candidates > 1 else choice.committed).append(token)
            text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            start = max(0, len(row.text) - max((len(s) for s in sp.stop), default=0))
            cut = find_stop(text, sp.stop, start) if sp.stop else -1
            row.text = text if cut < 0 else text[:cut]
            if cut >= 0:
                row.finish_reason = "stop"
            elif len(row.ids) >= sp.max_tokens or len(choice.request.gen.prompt_token_ids) + len(row.ids) >= self.max_model_len:
                row.finish_reason = "length"
        block_end = ctrl.mode == "block" and len(row.pending) >= ctrl.block_size
        row.waiting = ctrl.candidates > 1 and (row.finish_reason is not None or block_end)

    def _advance(self, choice: Choice) -> None:
        """Accept output: at once for single-row choices, by selection when all K candidates wait."""
        ctrl = choice.request.gen.control
        if ctrl.candidates == 1:
            row = choice.rows[0]
            choice.text = row.text
            if row.finish_reason:
                self._finish_single(choice, row)
            return
        if not all(r.waiting for r in choice.rows):
            return
        positions = torch.tensor([max(r.gen_position - 1, 0) for r in choice.rows])
        raw = torch.stack([r.last_values for r in choice.rows])  # (K, H)
        weights = torch.tensor([ctrl.weights] * len(choice.rows), dtype=raw.dtype)
        values = self.scorer.combine(raw.to(self.device), positions.to(self.device),
                                     weights.to(self.device)).cpu()  # (K,)
        w = select_candidate(values, ctrl.selection, ctrl.strength, choice.request.selection_generator)
        winner = choice.rows[w]
        choice.committed = choice.committed + winner.pending
        choice.text = winner.text
        choice.selections += 1
        choice.kl += best_of_n_kl_bound(len(choice.rows))
        choice.values, choice.combined = winner.last_values, float(values[w])
        if winner.finish_reason:
            choice.finish_reason = winner.finish_reason
            return
        for r in choice.rows:  # every candidate continues from the winner (rows forked below)
            r.fork_from = winner
            r.pending, r.text, r.last_token, r.waiting = [], winner.text, winner.last_token, False

    def _finish_single(self, choice: Choice, row: Row) -> None:
        ctrl = choice.request.gen.control
        choice.finish_reason = row.finish_reason
        choice.kl = row.kl
        if ctrl.mode == "none":  # no scorer state was kept: one pass over the finished output
            # as in the other modes, a sequence that ended with EOS is valued at the EOS token
            out = choice.committed + ([row.last_token] if row.last_token in self.eos else [])
            out = out or [row.last_token]
            row.last_values = self.scorer.final_values(choice.request.gen.prompt_token_ids, out).float().cpu()
        if row.last_values is not None:
            choice.values = row.last_values
            pos = torch.tensor([max(row.gen_position - 1, 0)], device=self.device)
            w = torch.tensor([ctrl.weights], device=self.device, dtype=torch.float32)
            choice.combined = float(self.scorer.combine(row.last_values[None].to(self.device), pos, w)[0])

    def _emit(self, choices) -> dict[int, int]:
        """Send each request the new text of its choices; returns forks {row id: source row id}."""
        by_request: dict[int, list[ChoiceDelta]] = {}
        forks = {}
        for choice in choices:
            for r in choice.rows:
                src = getattr(r, "fork_from", None)
                if src is not None and src is not r:
                    forks[id(r)] = id(src)
                r.fork_from = None
            stops = choice.request.gen.sampling.stop
            end = len(choice.text) if choice.finished else safe_prefix_len(choice.text, stops)
            ids = choice.committed[choice.emitted_ids:]
            if end <= choice.emitted and not ids and not choice.finished:
                continue
            delta = ChoiceDelta(index=choice.index, text=choice.text[choice.emitted:end], token_ids=ids,
                                finish_reason=choice.finish_reason,
                                control=choice.control_values(self.heads) if choice.finished else None)
            choice.emitted, choice.emitted_ids = max(choice.emitted, end), len(choice.committed)
            by_request.setdefault(id(choice.request), []).append(delta)
        for choice in {id(c.request): c for c in choices}.values():
            deltas = by_request.get(id(choice.request))
            if deltas:
                choice.request.sink(choice.request.output(deltas))
        return forks

    def _remove_rows(self, leaves, forks: dict[int, int] | None = None) -> None:
        """Drop rows for which `leaves(row)` holds and apply forks (row takes its source's cache)."""
        forks = forks or {}
        if not forks and not any(leaves(r) for r in self.rows):
            return
        position = {id(r): i for i, r in enumerate(self.rows)}
        ctrl_pos = {id(self.rows[b]): s for s, b in enumerate(self._controlled())}
        keep = [r for r in self.rows if not leaves(r)]
        self.runner.select_rows(torch.tensor([position[forks.get(id(r), id(r))] for r in keep],
                                             dtype=torch.long, device=self.device))
        self.scorer.select_rows(torch.tensor([ctrl_pos[forks.get(id(r), id(r))] for r in keep if r.controlled],
                                             dtype=torch.long, device=self.device))
        self.rows = keep

    def fail_all(self, error: BaseException) -> None:
        """A step raised: every request in flight gets the error; the batch starts empty."""
        states = {id(r.choice.request): r.choice.request for r in self.rows}
        for state in list(states.values()) + list(self.waiting):
            state.sink(error)
        self._admitted(len(self.waiting))
        self.waiting.clear()
        self._remove_rows(lambda r: True)
