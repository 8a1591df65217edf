"""Methods vLLM mixes into its workers (`worker_extension_cls`), called from the server process
through `AsyncLLM.collective_rpc`: what the logits processor kept per choice comes back here."""

from __future__ import annotations

from collections.abc import Sequence


class ScorerWorkerExtension:
    def _cdserve_processor(self):
        from cdserve.backends.vllm.logits_processor import ScorerLogitsProcessor

        batch = getattr(self.model_runner, "input_batch", None)  # type: ignore[attr-defined]
        procs = batch.logitsprocs.all if batch is not None else []
        return next((p for p in procs if isinstance(p, ScorerLogitsProcessor)), None)

    def cdserve_kl(self, requests: Sequence[tuple[str, int]], forget: Sequence[str] = ()) -> dict[str, float]:
        """KL(steered || base) summed over the first n tokens of each (key, n); choices the server
        aborted (`forget`) are dropped. Keys the worker never saw are left out."""
        proc = self._cdserve_processor()
        if proc is None:
            return {}
        proc.rows.forget(forget)
        if not _last_pipeline_stage():  # earlier stages track the rows but never see logits
            return {}
        out = {}
        for key, n in requests:
            kl = proc.rows.kl_of(key, n)
            if kl is not None:
                out[key] = kl
        return out

    def cdserve_state(self, forget: Sequence[str] = ()) -> dict[str, int]:
        """Sizes of the scorer state (tests: cancelled requests must not leave any behind)."""
        proc = self._cdserve_processor()
        if proc is None:
            return {}
        proc.rows.forget(forget)
        rows = proc.rows
        return {"live": len(rows), "slots": len(rows.slots), "cache_rows": rows.kv.batch_size,
                "finished": len(rows.finished)}

    def cdserve_scorer_steps(self) -> list[float]:
        """The logits processor's time (seconds) of each step since the last call, oldest first
        (stats.py: the metrics' scorer step time); the worker forgets them."""
        from cdserve.backends.vllm.stats import scorer_clock

        proc = self._cdserve_processor()
        return [] if proc is None else scorer_clock(proc).take()


def _last_pipeline_stage() -> bool:
    """Pipeline parallel: only the last stage computes logits, so only its KL is real."""
    try:
        from vllm.distributed import get_pp_group

        return get_pp_group().is_last_rank
    except (ImportError, AssertionError):  # no distributed state (unit tests): a single stage
        return True
