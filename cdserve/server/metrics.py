"""Prometheus metrics. Request metrics are recorded by the serving layer; engine metrics come from
the engine's StepStats (a stats listener) and its load, read at scrape time; reward metrics from
the reward service (a listener per underlying reward call).

The metric names are a contract with the dashboards in deploy/: do not rename them. Each help
text says what the metric means; it means the same on the hf and the vllm engine (deploy/README.md,
"Monitoring", says where each engine measures it).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the route)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from cdserve.engine_protocol import Engine
from cdserve.outputs import StepStats
from cdserve.rewards import RewardService

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_REWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    """All of cdserve's metrics, in their own registry (no module-global state)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("cdserve_requests_total", "Generation requests by endpoint, control "
                                "mode and HTTP status (499: the client went away).",
                                ["endpoint", "mode", "status"], registry=r)
        self.queue_depth = Gauge("cdserve_queue_depth", "Requests waiting for admission: accepted requests "
                                 "whose n x K rows do not yet fit beside the earlier ones in max_batch_rows "
                                 "(the shared admission policy, cdserve/admission.py; max_waiting caps it).",
                                 registry=r)
        self.in_flight = Gauge("cdserve_requests_in_flight", "Generation requests being served "
                               "(queued or running).", registry=r)
        self.running = Gauge("cdserve_requests_running", "Requests admitted to the batch (their n x K rows "
                             "count against max_batch_rows).", registry=r)
        self.ttft = Histogram("cdserve_time_to_first_token_seconds", "Request arrival to first "
                              "output token.", ["mode"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("cdserve_time_per_output_token_seconds", "Mean time between output "
                              "tokens after the first, per request.", ["mode"],
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("cdserve_e2e_request_latency_seconds", "Request arrival to last token.",
                             ["mode"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("cdserve_prompt_tokens_total", "Prompt tokens of served "
                                     "requests.", ["mode"], registry=r)
        self.generation_tokens = Counter("cdserve_generation_tokens_total", "Output tokens sent to "
                                         "clients.", ["mode"], registry=r)
        self.scorer_step = Histogram("cdserve_scorer_step_seconds", "Prefix-scorer time: one observation "
                                     "per engine step that ran the scorer (its time in that step: hf the "
                                     "scorer step and steering; vLLM the logits processor in the worker) and "
                                     "one per scorer call outside the step (vLLM: block / best_of_n "
                                     "selection, final values). _sum / cdserve_engine_step_seconds_sum is "
                                     "the scorer's share of engine time.", buckets=_STEP_BUCKETS, registry=r)
        self.engine_step = Histogram("cdserve_engine_step_seconds", "Wall time of one engine step (base "
                                     "model, scorer in the step, sampling, bookkeeping), idle time excluded; "
                                     "vLLM: the engine core's time between two consecutive outputs of a "
                                     "sequence (steps with only first tokens are not timed).",
                                     buckets=_STEP_BUCKETS, registry=r)
        self.candidates = Counter("cdserve_candidates_generated_total", "Tokens sampled as block / "
                                  "best_of_n candidates, all K candidates counted (kept or not).", registry=r)
        self.prefill = Counter("cdserve_prefill_tokens_total", "Prompt tokens the base model computed "
                               "(prefix-cache hits and forked KV excluded).", registry=r)
        self.forked = Counter("cdserve_kv_forked_tokens_total", "vLLM block mode: prompt tokens whose KV "
                              "was copied from the previous block's winner instead of recomputed.", registry=r)
        self.batch_rows = Gauge("cdserve_batch_rows", "Sequences decoded in the engine's last step: each "
                                "choice of a request is one, each block / best_of_n candidate is one (0 when "
                                "idle).", registry=r)
        self.reward_calls = Counter("cdserve_reward_calls_total", "Underlying reward calls (each scores "
                                    "a batch of texts from one or more requests) by reward and outcome "
                                    "(ok, error: failed, timed out or answered invalid scores).",
                                    ["reward", "outcome"], registry=r)
        self.reward_seconds = Histogram("cdserve_reward_call_seconds", "Reward call time, from its "
                                        "dispatch to its answer (or its timeout).", ["reward"],
                                        buckets=_REWARD_BUCKETS, registry=r)
        self.reward_texts = Counter("cdserve_reward_texts_total", "Texts scored by reward calls "
                                    "(failed calls included).", ["reward"], registry=r)
        self._last_rows = 0

    def bind(self, engine: Engine) -> None:
        """Read the engine's load at scrape time and listen to its steps."""
        self.queue_depth.set_function(lambda: engine.load().waiting)
        self.running.set_function(lambda: engine.load().running)
        self.batch_rows.set_function(lambda: self._last_rows if engine.load().running else 0)
        engine.add_stats_listener(self.on_step)

    def bind_rewards(self, rewards: RewardService) -> None:
        rewards.add_listener(self.on_reward_call)

    def on_reward_call(self, reward: str, texts: int, seconds: float, ok: bool) -> None:
        self.reward_calls.labels(reward, "ok" if ok else "error").inc()
        self.reward_seconds.labels(reward).observe(seconds)
        self.reward_texts.labels(reward).inc(texts)

    def on_step(self, stats: StepStats) -> None:
        if stats.step_seconds > 0:
            self.engine_step.observe(stats.step_seconds)
        if stats.scorer_seconds > 0:
            self.scorer_step.observe(stats.scorer_seconds)
        if stats.candidates_generated:
            self.candidates.inc(stats.candidates_generated)
        if stats.prefill_tokens:
            self.prefill.inc(stats.prefill_tokens)
        if stats.forked_tokens:
            self.forked.inc(stats.forked_tokens)
        if stats.batch_rows is not None:  # None: work reported apart from its step (vLLM)
            self._last_rows = stats.batch_rows

    def render(self) -> bytes:
        return generate_latest(self.registry)
