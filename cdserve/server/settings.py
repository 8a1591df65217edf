"""The server's one configuration class: `cdserve serve` flags and CDSERVE_* environment variables.

Precedence: flags, then environment (`CDSERVE_MAX_MODEL_LEN=4096`, nested control as
`CDSERVE_CONTROL__STRENGTH=3` or a JSON `CDSERVE_CONTROL='{"mode": "token"}'`, rewards likewise:
`CDSERVE_REWARDS__HTTP='{"toxicity": "http://127.0.0.1:9000/score"}'`), then defaults.
The engine's part becomes an `EngineConfig`; the rest (host, port, auth, limits of the HTTP layer)
stays here. Any invalid value stops start-up with a message naming the setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdserve.config import DEFAULT_SCORER, EMBEDDED_MODEL, EngineConfig
from cdserve.control.request import ControlConfig
from cdserve.rewards import RewardConfig
from prefix_scorers.base_model import EMBEDDED, default_cache_dir

ENV_PREFIX = "CDSERVE_"
BUILTIN_SCORERS = {DEFAULT_SCORER, "untrained"}


class ServerSettings(BaseSettings):
    """Everything `cdserve serve` can be told. Engine fields mirror `EngineConfig`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__",
                                      extra="forbid", validate_default=True)

    # --- the engine (see cdserve.config.EngineConfig) ---
    model: str = Field(EMBEDDED_MODEL, description="'smollm2' (the embedded SmolLM2-135M-Instruct) "
                       "or a local Hugging Face model folder.")
    served_model_name: str | None = Field(None, description="Name clients send as `model` "
                                          "(default: derived from the model).")
    scorer: str = Field(DEFAULT_SCORER, description="'default', 'untrained', or a scorer "
                        "checkpoint directory.")
    backend: Literal["auto", "hf", "vllm"] = Field("auto", description="auto: vllm if installed "
                                                   "and working, else hf.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N, mps.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: "
                                                                     "float32 on CPU, bfloat16 on GPU.")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Converted models and "
                            "built scorers are kept here.")
    max_model_len: int = Field(2048, ge=16, description="Prompt + output tokens per sequence.")
    max_batch_rows: int = Field(64, ge=1, description="Sequences decoded together per step.")
    max_waiting: int = Field(256, ge=0, description="Requests queued before new ones get 503.")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    max_n: int = Field(16, ge=1, description="Largest n a request may ask for.")
    seed: int = Field(0, description="Seed of the engine's generator for unseeded requests.")
    control: ControlConfig = Field(default_factory=ControlConfig,
                                   description="Default control and its limits (JSON).")
    rewards: RewardConfig = Field(default_factory=RewardConfig, description="Rewards requests may "
                                  "rank candidates by, and how they are called (JSON).")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm backend: tensor parallel size.")
    pipeline_parallel_size: int = Field(1, ge=1, description="vllm backend: pipeline parallel size.")
    distributed_executor_backend: Literal["auto", "mp", "ray", "uni"] = Field(
        "auto", description="vllm backend: executor; 'ray' for pipeline parallelism across nodes.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vllm backend: GPU memory share.")
    enforce_eager: bool = Field(False, description="vllm backend: skip graph compilation.")
    kv_cache_space_gib: float = Field(4.0, gt=0, description="vllm backend on CPU: KV cache GiB.")
    scorer_threads: int | None = Field(None, ge=1, description="vllm backend: torch threads per server-side "
                                       "scorer call (default: torch's).")
    block_fork_hold_s: float = Field(2.0, ge=0, description="vllm backend, block mode: seconds a finished "
                                     "candidate's KV is kept for the next block to fork (0: off).")

    # --- the HTTP layer ---
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port).")
    api_key: SecretStr | None = Field(None, description="If set, /v1/* requires "
                                      "'Authorization: Bearer <key>'.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies get 413.")
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="On SIGTERM, time in-flight "
                                          "requests get to finish before they are cancelled.")
    retry_after_seconds: int = Field(1, ge=1, description="Retry-After sent with 503 (queue full).")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level.")

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.model not in EMBEDDED and not (Path(self.model).expanduser() / "config.json").is_file():
            raise ValueError(f"model={self.model!r} is neither an embedded model {sorted(EMBEDDED)} "
                             "nor a local Hugging Face model folder (no config.json there)")
        if self.scorer not in BUILTIN_SCORERS and not (Path(self.scorer).expanduser() / "config.json").is_file():
            raise ValueError(f"scorer={self.scorer!r} is neither one of {sorted(BUILTIN_SCORERS)} "
                             "nor a scorer checkpoint directory (no config.json there)")
        if self.api_key is not None and not self.api_key.get_secret_value():
            raise ValueError("api_key is set but empty; unset CDSERVE_API_KEY to disable auth")
        self.engine_config()  # cross-field checks of the engine, named by their settings
        return self

    def engine_config(self) -> EngineConfig:
        fields = set(EngineConfig.model_fields)
        return EngineConfig(**{k: getattr(self, k) for k in type(self).model_fields if k in fields})


def describe_error(err: ValidationError) -> str:
    """One line per bad setting, naming both its flag and its environment variable."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        msg = e["msg"].removeprefix("Value error, ")
        if not loc:
            lines.append(f"invalid configuration: {msg}")
            continue
        flag = "--" + "-".join(loc).replace("_", "-")
        env = ENV_PREFIX + "__".join(loc).upper()
        lines.append(f"invalid setting {flag} / {env}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)
