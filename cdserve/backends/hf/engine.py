"""HFEngine: the `hf` backend behind the engine seam. The step loop runs in one background thread
(torch releases the GIL); requests and results cross into asyncio through thread-safe queues."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch

from cdserve.admission import Admission
from cdserve.backends.hf.engine_core import EngineCore
from cdserve.backends.hf.model_runner import ModelRunner
from cdserve.backends.hf.sequence import RequestState
from cdserve.backends.scorer_runner import ScorerRunner
from cdserve.config import EngineConfig
from cdserve.outputs import EngineLoad, GenerationRequest, RequestOutput, StepStats
from cdserve.rewards import RewardService
from cdserve.scorer_store import resolve_scorer
from cdserve.text import eos_token_ids
from prefix_scorers.base_model import load_model, load_tokenizer, resolve_model
from prefix_scorers.checkpoint import load_scorer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(setting: str) -> torch.device:
    if setting != "auto":
        return torch.device(setting)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return _DTYPES[setting]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class HFEngine:
    backend_name = "hf"

    def __init__(self, config: EngineConfig):
        self.config = config
        self.core: EngineCore | None = None
        self._listeners: list[Callable[[StepStats], None]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running: set[str] = set()
        self.admission = Admission(config.max_batch_rows, config.max_waiting)

    # -- loading ----------------------------------------------------------------------------------
    def load_sync(self) -> None:
        cfg = self.config
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.model_dir = resolve_model(cfg.model, cfg.cache_dir)
        self.model_name = cfg.served_model_name or Path(self.model_dir).name
        self.tokenizer = load_tokenizer(self.model_dir)
        model = load_model(self.model_dir, str(self.device), self.dtype)
        self.max_model_len = min(cfg.max_model_len, getattr(model.config, "max_position_embeddings", cfg.max_model_len))
        self.scorer_dir = resolve_scorer(cfg.scorer, self.model_dir, cfg.cache_dir, model, self.tokenizer)
        scorer = load_scorer(self.scorer_dir, self.tokenizer, model.get_input_embeddings().weight,
                             device=self.device, dtype=self.dtype, base_name=self.model_name)
        self.scorer_config = scorer.config
        cfg.control.check_heads(self.head_names)
        eos = eos_token_ids(self.model_dir, self.tokenizer)
        self.rewards = RewardService(cfg.rewards)
        scorer_runner = ScorerRunner(scorer, self.device, cfg.scorer_prefix_cache_tokens)
        self.core = EngineCore(ModelRunner(model, self.device), scorer_runner,
                               self.tokenizer, cfg, self.head_names, eos, self.max_model_len, self.rewards)
        log.info("hf engine: %s on %s (%s), scorer %s (%s, heads %s)", self.model_name, self.device,
                 self.dtype, self.scorer_dir, "trained" if scorer.config.provenance.trained else "UNTRAINED",
                 self.head_names)

    @property
    def head_names(self) -> list[str]:
        return self.scorer_config.head_names

    async def start(self) -> None:
        if self.core is None:
            await asyncio.to_thread(self.load_sync)
        self._thread = threading.Thread(target=self._loop, name="cdserve-hf-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, grace_seconds: float = 0.0) -> None:
        deadline = time.monotonic() + grace_seconds
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._running):
            self.abort(request_id)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        if self.core is not None:
            self.rewards.close()

    # -- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            if not self.core.has_work():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                stats = self.core.step()
            except Exception as e:  # one bad step fails the requests in flight, not the server
                log.exception("engine step failed")
                self.core.fail_all(e)
                continue
            if stats is not None:
                for listener in self._listeners:
                    listener(stats)

    # -- requests ---------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        state = RequestState(gen=request, sink=lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        self.admission.admit(request, self.max_model_len)  # 400 / 503 before any work
        self.core.submit(state)
        self._running.add(request.request_id)
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._running.discard(request.request_id)
            self.admission.release(request.request_id)
            if not finished:  # the caller went away (disconnect, cancel): free the rows now
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._wake.set()

    def load(self) -> EngineLoad:
        return self.admission.load()

    def add_stats_listener(self, listener: Callable[[StepStats], None]) -> None:
        self._listeners.append(listener)
