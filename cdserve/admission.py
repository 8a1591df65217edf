"""One admission policy for both engines: what a request costs, when it is refused, when it waits.

- A request occupies n x K rows (K: block/best_of_n candidates, else 1); `max_batch_rows` is the
  most rows decoded together. A request that could never fit is a 400 naming `n` (or
  `control.num_candidates` when n is 1), whatever the engine.
- Requests run in arrival order once their rows fit beside those running; the others wait
  (`admissible`: the hf scheduler admits by it; vLLM schedules itself, and both report by it).
  `max_waiting` caps the *requests* waiting: one more is a 503 (QueueFullError).
- `load()` reports requests running and waiting under that policy (the metrics' queue depth).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from cdserve.engine_protocol import QueueFullError
from cdserve.errors import InvalidRequestError
from cdserve.outputs import EngineLoad, GenerationRequest


def check_prompt(prompt: list[int], max_model_len: int) -> None:
    if not prompt:
        raise InvalidRequestError("prompt", "the prompt is empty")
    if len(prompt) >= max_model_len:
        raise InvalidRequestError("prompt", f"the prompt has {len(prompt)} tokens; this model's context "
                                  f"is {max_model_len}", code="context_length_exceeded")


def admissible(rows: Iterable[int], used: int, max_batch_rows: int) -> int:
    """How many requests, in arrival order with these row counts, run beside `used` rows already
    running: the longest prefix that fits (a request that does not fit holds back those after it,
    so a big request is not starved by small ones). The policy both engines follow: the hf
    scheduler admits by it, and `Admission.load` counts by it for both."""
    count = 0
    for r in rows:
        if used + r > max_batch_rows:
            break
        used += r
        count += 1
    return count


class Admission:
    def __init__(self, max_batch_rows: int, max_waiting: int):
        self.max_batch_rows, self.max_waiting = max_batch_rows, max_waiting
        self.in_flight: OrderedDict[str, int] = OrderedDict()  # request id -> rows, arrival order

    def rows(self, request: GenerationRequest) -> int:
        n, k = request.sampling.n, request.control.candidates
        if n * k > self.max_batch_rows:
            param = "n" if n > 1 else "control.num_candidates"
            raise InvalidRequestError(param, f"n x num_candidates = {n} x {k} = {n * k} rows exceeds the "
                                      f"server's max_batch_rows={self.max_batch_rows}; ask for fewer")
        return n * k

    def admit(self, request: GenerationRequest, max_model_len: int) -> int:
        """Check a new request (400 / 503 before any work) and count it in flight."""
        check_prompt(request.prompt_token_ids, max_model_len)
        rows = self.rows(request)
        waiting = self.load().waiting
        if waiting >= self.max_waiting:
            raise QueueFullError(f"{waiting} requests are waiting (max_waiting={self.max_waiting}); retry later")
        self.in_flight[request.request_id] = rows
        return rows

    def release(self, request_id: str) -> None:
        self.in_flight.pop(request_id, None)

    def load(self) -> EngineLoad:
        """Requests running (the longest arrival-order prefix whose rows fit) and waiting."""
        running = admissible(self.in_flight.values(), 0, self.max_batch_rows)
        return EngineLoad(waiting=len(self.in_flight) - running, running=running)
