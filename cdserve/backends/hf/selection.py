"""After a step, each touched choice moves on: a finished streaming choice (none/token) gets its
values; a block / best_of_n choice whose K candidates all wait is valued (scorer values, plus the
request's rewards computed off the engine thread) and its ChoiceController selects: every row
forks from the winner, or, for pruned best-of-N, the survivors resume from their own caches.
The rows' fork / resume / done events are applied to the KV caches by the batch (batch.py).
"""

from __future__ import annotations

import torch

from cdserve.backends.hf.sequence import Choice, RequestState, RowState
from cdserve.backends.scorer_runner import ScorerRunner
from cdserve.control.choice import ChoiceController
from cdserve.errors import reward_failed
from cdserve.rewards import RewardError, RewardService


class Selection:
    def __init__(self, scorer: ScorerRunner, rewards: RewardService):
        self.scorer, self.rewards = scorer, rewards
        self.device = scorer.device

    def advance(self, choice: Choice) -> None:
        """Streaming choices: values once finished. Block/best_of_n: select when all K wait."""
        ctl = choice.ctl
        if ctl.streaming:
            if ctl.finished:
                self._final_values(choice)
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
        for r in choice.rows:  # every candidate continues from the winner (caches forked by the batch)
            r.fork(winner)

    def _final_values(self, choice: Choice) -> None:
        """A finished streaming answer's values: the last taken token's, kept by the step, or (mode
        none kept no scorer state) one scorer pass over the answer."""
        ctl = choice.ctl
        row = next(r for r in choice.rows if not ctl.candidates[r.k].pruned)  # pruning's survivor
        raw = None if row.last_values is None else row.last_values.cpu()
        if raw is None:
            raw = self.scorer.final_values(choice.request.gen.prompt_token_ids, ctl.taken()).float().cpu()
        values, spread = self.scorer.head_values(raw[None])
        ctl.set_values(values[0], float(self._combine(raw[None], [ctl.final_position()], ctl)[0]),
                       None if spread is None else spread[0])

    def _combine(self, raw: torch.Tensor, positions: list[int], ctl: ChoiceController) -> torch.Tensor:
        """Combined values (N,) of raw member values (N, H*E) at answer positions, with the
        request's risk."""
        pos = torch.tensor(positions, device=self.device)
        w = torch.tensor([ctl.control.weights] * len(positions), device=self.device, dtype=torch.float32)
        risk = torch.full((len(positions),), ctl.control.risk, device=self.device)
        return self.scorer.combine(raw.to(self.device), pos, w, risk).float().cpu()

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
            _fail(choice.request, reward_failed(e))
            return None


def _fail(state: RequestState, error: BaseException) -> None:
    """One request fails (its rows leave with the others' next removal); the rest go on."""
    state.sink(error)
    for choice in state.choices:
        choice.ctl.fail()
