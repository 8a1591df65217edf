"""What the routes share: settings, the engine, metrics, the serving layer, and the server's phase."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cdserve.engine_protocol import Engine
from cdserve.rewards import RewardService
from cdserve.server import protocol as p
from cdserve.server.metrics import ServerMetrics
from cdserve.server.serving import OpenAIServing
from cdserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "draining", "stopped", "failed"]


@dataclass
class ServerState:
    settings: ServerSettings
    engine: Engine
    metrics: ServerMetrics
    serving: OpenAIServing
    status: Status = "loading"
    started_at: int = field(default_factory=lambda: int(time.time()))
    loop: asyncio.AbstractEventLoop | None = None  # the server's loop, set at start-up
    models: p.RequestModels | None = None  # the request models, with the loaded engine's limits
    on_fatal: Callable[[], None] | None = None  # how to stop the server if loading fails
    rewards: RewardService | None = None  # the engine's reward service, once it has loaded
    own_rewards: bool = False  # built here, for an engine without one (closed at stop)

    async def load(self) -> None:
        """Start the engine; on failure say why and stop the server."""
        engine = self.engine
        try:
            await engine.start()
            self.rewards = getattr(engine, "rewards", None)
            if self.rewards is None:  # an engine that builds none: the listing and metrics still work
                self.rewards, self.own_rewards = RewardService(engine.config.rewards), True
        except Exception:
            self.status = "failed"
            log.exception("start-up failed: the engine did not load model=%r scorer=%r backend=%r",
                          self.settings.model, self.settings.scorer, self.settings.backend)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        self.metrics.bind(engine)
        self.metrics.bind_rewards(self.rewards)
        self.models = p.RequestModels.build(self.limits(loaded=True))
        if self.status == "loading":
            self.status = "ready"
        log.info("ready: model '%s' (max_model_len %d), scorer '%s' (heads %s), backend %s%s",
                 engine.model_name, engine.max_model_len, self.scorer_id, engine.head_names,
                 engine.backend_name, ", API key required" if self.settings.api_key else "")

    async def stop(self, loading: asyncio.Task) -> None:
        """After uvicorn drained (or cancelled) the requests: stop the engine."""
        was_ready = self.status in ("ready", "draining")
        if not loading.done():
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
        if self.status != "failed":
            self.status = "stopped"
        if was_ready:
            await self.engine.shutdown(0.0)
        if self.own_rewards:
            self.rewards.close()

    def begin_drain(self) -> None:
        """SIGTERM (called from the signal handler): /ready turns 503, new requests get 503, and
        in-flight ones get the grace period."""
        if self.status != "ready" or self.loop is None:
            return
        self.status = "draining"
        grace = self.settings.shutdown_grace_seconds
        log.info("draining: up to %gs for in-flight requests", grace)
        self.loop.call_soon_threadsafe(self.serving.drain.begin, grace)

    def limits(self, loaded: bool) -> p.Limits:
        """What requests are held to: the settings, and the engine's facts once it has loaded."""
        s, engine = self.settings, self.engine
        if not loaded:
            return p.Limits(max_tokens_limit=s.max_tokens_limit, max_n=s.max_n, control=s.control,
                            max_model_len=s.max_model_len)
        return p.Limits(max_tokens_limit=s.max_tokens_limit, max_n=s.max_n, control=engine.config.control,
                        max_model_len=engine.max_model_len, model=engine.model_name,
                        vocab_size=len(engine.tokenizer), heads=tuple(engine.head_names),
                        rewards=self._reward_names())

    def _reward_names(self) -> tuple[str, ...]:
        return tuple(self.serving.reward_names())

    @property
    def scorer_id(self) -> str:
        """The loaded scorer's folder name ('default' may resolve to an untrained stand-in)."""
        return Path(getattr(self.engine, "scorer_dir", None) or self.settings.scorer).name

    def scorer_info(self) -> p.ScorerInfo:
        cfg, control = self.engine.scorer_config, self.engine.config.control
        heads = self.engine.head_names
        weights = control.default_weights(heads)
        return p.ScorerInfo(
            id=self.scorer_id, trained=cfg.provenance.trained, base_model=cfg.provenance.base_model,
            heads=[p.HeadInfo(name=h.name, description=h.description, reward=h.reward,
                              reward_range=h.reward_range, default_weight=weights.get(h.name, 0.0),
                              uncertainty=cfg.ensemble_size > 1, ensemble_size=cfg.ensemble_size)
                   for h in cfg.heads],
            defaults={"mode": control.mode, "weights": weights, "strength": control.strength,
                      "top_k": control.top_k, "tail": control.tail, "block_size": control.block_size,
                      "num_candidates": control.num_candidates, "selection": control.selection,
                      "risk": control.risk, "plausibility": control.plausibility},
            ranges={"weights": p.Range(min=-control.max_abs_weight, max=control.max_abs_weight),
                    "strength": p.Range(min=0, max=control.max_strength),
                    "top_k": p.Range(min=0, max=control.max_top_k),
                    "block_size": p.Range(min=1, max=control.max_block_size),
                    "num_candidates": p.Range(min=1, max=control.max_num_candidates),
                    "risk": p.Range(min=-1, max=1), "plausibility": p.Range(min=0, max=1)},
            modes=["none", "token", "block", "best_of_n"],
            provenance=cfg.provenance.model_dump())
