"""Token-mode steering inside vLLM: a V1 logits processor running in the worker.

For each request whose `SamplingParams.extra_args["cdserve"]` asks for token mode, at every step

    logits'(z) = logits(z) + strength * sum_h w_h (Q_h(x, y, z) - mean_h[pos]) / std_h[pos]

(Q_h: the head's ensemble mean + risk * spread for an ensemble scorer; token_steering.py, the
code the hf engine runs too)

over the base model's top_k tokens (-inf elsewhere; top_k 0: every token), pos being the index of
the token being generated. All controlled requests of a step share one scorer call; requests
without control cost nothing. vLLM applies non-argmax-invariant processors before temperature,
top-p and seeded sampling, so sampling then draws from p(z) exp(strength * Q(z)) on the top-k.

The per-step KL(steered || base) is kept per choice until the server fetches it through the
worker extension (`worker_extension.py`).

Registered explicitly (`logits_processors=[ScorerLogitsProcessor]`); the scorer directory comes
from configuration, never from the process environment (two engines in one process may use two
scorers): the engine's `additional_config["cdserve_scorer"]` in the worker, and each token-mode
request's `extra_args["cdserve"]["scorer"]` where vLLM validates requests (the server process,
where `validate_params` sees nothing but the request).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from cdserve.backends.token_steering import TokenRows, steer_in_place
from cdserve.backends.vllm.scorer_loading import load_scorer_for_model
from cdserve.backends.vllm.scorer_rows import Row, ScorerRows, parse_control
from cdserve.backends.vllm.stats import timed_apply
from cdserve.control.segments import entropy_ends
from cdserve.control.steering import sampled_kl
from prefix_scorers.config import ScorerConfig
from prefix_scorers.model import PrefixScorer

if TYPE_CHECKING:
    from vllm.config import VllmConfig

CONFIG_KEY = "cdserve_scorer"  # additional_config key: the worker's scorer directory
SCORER_KEY = "scorer"  # extra_args["cdserve"] key: the scorer a token-mode request was made for


@functools.lru_cache(maxsize=4)
def _num_heads(scorer_dir: str) -> int:
    return len(ScorerConfig.load(scorer_dir).heads)


class ScorerLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Runs in the server process when a request is admitted: ValueError -> HTTP 400."""
        spec = (sampling_params.extra_args or {}).get("cdserve")
        if spec is None:
            return
        scorer_dir = spec.get(SCORER_KEY)
        if spec.get("mode") == "token" and not scorer_dir:
            raise ValueError(f"cdserve token mode needs extra_args['cdserve']['{SCORER_KEY}'], the scorer "
                             "directory the engine was started with")
        parse_control(sampling_params.extra_args, _num_heads(scorer_dir) if scorer_dir else 0,
                      sampling_params.temperature, sampling_params.top_p)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        extra = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
        scorer_dir = extra.get(CONFIG_KEY)
        if not scorer_dir:
            raise ValueError(f"ScorerLogitsProcessor needs a scorer: additional_config['{CONFIG_KEY}'] "
                             "(the engine's scorer directory)")
        model_dir = vllm_config.model_config.model
        scorer = load_scorer_for_model(scorer_dir, model_dir, device=device)
        vocab = vllm_config.model_config.get_vocab_size()
        if scorer.config.architecture.vocab_size != vocab:
            raise ValueError(f"scorer {scorer_dir} has vocabulary {scorer.config.architecture.vocab_size}, "
                             f"the model {model_dir} has {vocab}")
        self._setup(scorer, device)

    @classmethod
    def from_scorer(cls, scorer: PrefixScorer, device: torch.device) -> ScorerLogitsProcessor:
        """A processor around a loaded scorer, without vLLM's config (tests, benchmarks)."""
        processor = cls.__new__(cls)
        processor._setup(scorer, device)
        return processor

    def _setup(self, scorer: PrefixScorer, device: torch.device) -> None:
        self.scorer = scorer
        self.device = device
        self.rows = ScorerRows(scorer, device)

    def is_argmax_invariant(self) -> bool:
        return False  # steering changes which token is greedy

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.remove(index)
        for index, params, prompt, output in batch_update.added:
            control = parse_control(params.extra_args, self.scorer.num_heads, params.temperature, params.top_p)
            self.rows.add(index, control, prompt, output)
        for src, dst, direction in batch_update.moved:
            self.rows.move(src, dst, swap=direction == MoveDirectionality.SWAP)
        self.rows.end_update()

    @timed_apply  # the scorer's time per step, for the metrics (stats.py)
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not len(self.rows):
            return logits  # no controlled request in the batch: nothing to do
        # Output ids are read now, not in update_state: with async scheduling the newest id is a
        # placeholder until vLLM fills it in right before the logits processors run.
        self.rows.sync()
        ends = self._segment_ends(logits)  # on the base logits, before anything changes them
        logits = self._steer_and_measure(logits)
        return logits if ends is None else self._force_ends(logits, *ends)

    def _steer_and_measure(self, logits: torch.Tensor) -> torch.Tensor:
        controlled = self.rows.controlled(logits.shape[0])  # token mode: steer in place, with each row's KL
        if controlled:
            self._keep_kl(controlled, steer_in_place(self.scorer, logits, self._token_rows(controlled)))
        measured = self.rows.measured(logits.shape[0])  # unsteered rows with top_p < 1: measure
        if measured:
            index = torch.tensor([i for i, _ in measured], device=logits.device)
            base = logits.index_select(0, index)  # (N, V)
            temperature = torch.tensor([r.control.temperature for _, r in measured], device=logits.device)
            top_p = torch.tensor([r.control.top_p for _, r in measured], device=logits.device)
            self._keep_kl(measured, sampled_kl(base, base, temperature, top_p))  # top-p truncation's KL
        return logits

    def _token_rows(self, picked: list[tuple[int, Row]]) -> TokenRows:
        rows = [r for _, r in picked]
        slots = torch.tensor([r.slot for r in rows], device=self.device)
        return TokenRows(index=[i for i, _ in picked], queries=self.rows.queries.index_select(0, slots),
                         weights=[r.control.weights for r in rows], strength=[r.control.strength for r in rows],
                         top_k=[r.control.top_k for r in rows], risk=[r.control.risk for r in rows],
                         positions=[len(r.output) for r in rows],  # index of the new token
                         temperature=[r.control.temperature for r in rows], top_p=[r.control.top_p for r in rows],
                         keep_tail=[r.control.keep_tail for r in rows],
                         plausibility=[r.control.plausibility for r in rows],
                         unheld=tuple(sorted({t for r in rows for t in r.control.unheld})))  # one model: its eos ids

    @staticmethod
    def _keep_kl(rows: list[tuple[int, Row]], kl: torch.Tensor) -> None:
        for j, (_, row) in enumerate(rows):
            # One entry per generated token; a step whose sample vLLM discards (a partial prefill
            # chunk) is overwritten by the next one.
            del row.kl[len(row.output):]
            row.kl.append(kl[j])

    def _segment_ends(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Block candidates with entropy segments (segments.py): (batch index, sentinel, ends) of
        each, ends (N,) bool: it ends before the token sampled now. None if there are none."""
        rows = self.rows.segmented(logits.shape[0])
        if not rows:
            return None
        dev = logits.device
        index = torch.tensor([i for i, _ in rows], device=dev)
        threshold = torch.tensor([r.control.entropy_threshold for _, r in rows], device=dev)
        taken = torch.tensor([len(r.output) for _, r in rows], device=dev)  # each block is its own request
        sentinel = torch.tensor([r.control.sentinel for _, r in rows], device=dev)
        return index, sentinel, entropy_ends(logits.index_select(0, index), threshold, taken)

    @staticmethod
    def _force_ends(logits: torch.Tensor, index: torch.Tensor, sentinel: torch.Tensor,
                    ends: torch.Tensor) -> torch.Tensor:
        """A candidate that ends here samples its sentinel, one of its stop tokens, so vLLM stops it
        without taking a real token (block.py drops the sentinel); the others never sample it."""
        rows = logits.index_select(0, index)
        rows.scatter_(1, sentinel[:, None], float("-inf"))
        forced = torch.full_like(rows, float("-inf")).scatter_(1, sentinel[:, None], 0.0)
        return logits.index_copy_(0, index, torch.where(ends[:, None], forced, rows))
