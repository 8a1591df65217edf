"""The vLLM scorer's directory travels through configuration, not the process environment: two
engines in one process, with scorers of different head counts, each validate their own token-mode
requests (validate_params, server process), and the worker's logits processor reads its scorer
from the engine's additional_config only."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams
from vllm.config import VllmConfig

from cdserve.backends.vllm.engine import token_extra_args, vllm_environment
from cdserve.backends.vllm.logits_processor import ScorerLogitsProcessor
from cdserve.config import VLLMConfig
from cdserve.control.request import ResolvedControl
from prefix_scorers.checkpoint import DEFAULT_HEADS, random_scorer, save_scorer

V = 64


@pytest.fixture(scope="module")
def scorer_dirs(tmp_path_factory):
    """Two scorers, as two engines would load: 2 heads and 3 heads."""
    return {n: save_scorer(random_scorer(V, None, DEFAULT_HEADS[:n], hidden_size=32, num_layers=1, seed=n),
                           tmp_path_factory.mktemp(f"scorer-{n}-heads")) for n in (2, 3)}


def token_params(num_weights: int, scorer_dir) -> SamplingParams:
    control = ResolvedControl(mode="token", weights=(1.0,) * num_weights, strength=1.0, top_k=5, block_size=8,
                              num_candidates=4, selection="argmax")
    return SamplingParams(temperature=0.0, extra_args=token_extra_args(control, "req-0", scorer_dir))


def test_two_engines_in_one_process_validate_against_their_own_scorers(scorer_dirs, monkeypatch):
    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_USE_V2_MODEL_RUNNER"):
        monkeypatch.delenv(name, raising=False)
    # each engine prepares the process's environment as it loads; the second one last
    vllm_environment(VLLMConfig(), on_cpu=True)
    vllm_environment(VLLMConfig(), on_cpu=True)
    ScorerLogitsProcessor.validate_params(token_params(2, scorer_dirs[2]))  # the first engine's request
    ScorerLogitsProcessor.validate_params(token_params(3, scorer_dirs[3]))  # the second engine's request
    with pytest.raises(ValueError, match=r"one weight per scorer head \(2\)"):
        ScorerLogitsProcessor.validate_params(token_params(3, scorer_dirs[2]))


def test_a_token_request_that_names_no_scorer_is_refused():
    params = SamplingParams(extra_args={"cdserve": {"mode": "token", "weights": [1.0, 0.0], "strength": 1.0,
                                                    "top_k": 5}})
    with pytest.raises(ValueError, match=r"extra_args\['cdserve'\]\['scorer'\]"):
        ScorerLogitsProcessor.validate_params(params)


def test_the_worker_takes_its_scorer_from_the_engine_config_not_the_environment(scorer_dirs, monkeypatch):
    monkeypatch.setenv("CDSERVE_VLLM_SCORER", str(scorer_dirs[2]))  # the route that no longer exists
    with pytest.raises(ValueError, match=r"additional_config\['cdserve_scorer'\]"):
        ScorerLogitsProcessor(VllmConfig(additional_config={}), torch.device("cpu"), False)


def test_token_extra_args_carry_the_models_eos_ids_which_plausibility_never_holds(scorer_dirs):
    from cdserve.backends.vllm.scorer_rows import parse_control

    control = ResolvedControl(mode="token", weights=(1.0, 0.0), strength=1.0, top_k=5, block_size=8,
                              num_candidates=4, selection="argmax", plausibility=0.05)
    extra = token_extra_args(control, "req-0", scorer_dirs[2], {2, 0})
    assert extra["cdserve"]["unheld"] == [0, 2]
    parsed = parse_control(extra, num_heads=2, temperature=0.7)
    assert (parsed.plausibility, parsed.unheld) == (0.05, (0, 2))
