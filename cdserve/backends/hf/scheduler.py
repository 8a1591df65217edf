"""Which requests join the hf engine's batch, and when: the waiting queue and its aborts.

Requests and aborts arrive from other threads through an inbox; the step loop drains it once
per step. Waiting requests join in arrival order while their rows fit beside the rows running
(`cdserve.admission.admissible`, the policy the vLLM engine reports by too). An aborted request
that is still waiting finishes with no choices; the ids of aborted running requests are handed
back for the engine to end.
"""

from __future__ import annotations

import queue
from collections import deque

from cdserve.admission import admissible
from cdserve.backends.hf.sequence import RequestState


class Scheduler:
    def __init__(self, max_batch_rows: int):
        self.max_batch_rows = max_batch_rows
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # RequestState to add | request id to abort
        self.waiting: deque[RequestState] = deque()

    # -- thread-safe entry points -------------------------------------------------------------------
    def submit(self, state: RequestState) -> None:
        self.inbox.put(state)

    def abort(self, request_id: str) -> None:
        self.inbox.put(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or not self.inbox.empty())

    # -- the step loop's side -------------------------------------------------------------------------
    def drain(self) -> set[str]:
        """Take what arrived. Aborted waiting requests finish (no choices); returns the ids of the
        other aborts (requests that may be running)."""
        aborted = set()
        while not self.inbox.empty():
            item = self.inbox.get()
            if isinstance(item, str):
                aborted.add(item)
            else:
                self.waiting.append(item)
        for state in [s for s in self.waiting if s.gen.request_id in aborted]:
            self.waiting.remove(state)
            state.sink(state.output([]))  # never admitted: finished with no choices
        return aborted

    def schedule(self, rows_running: int) -> list[RequestState]:
        """The waiting requests that join now (removed from the queue), in arrival order."""
        count = admissible((s.num_rows for s in self.waiting), rows_running, self.max_batch_rows)
        return [self.waiting.popleft() for _ in range(count)]

    def clear(self) -> list[RequestState]:
        """Every waiting request, removed (a failed step ends them with the running ones)."""
        states, self.waiting = list(self.waiting), deque()
        return states
