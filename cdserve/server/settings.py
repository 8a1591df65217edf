"""The server's one configuration class: `cdserve serve` flags and CDSERVE_* environment variables.

`ServerSettings` is the engine's `EngineConfig` (cdserve/config.py, where every engine setting and
its description is declared) plus the HTTP layer's settings below. Precedence: flags, then
environment (`CDSERVE_MAX_MODEL_LEN=4096`; sections per field, `CDSERVE_CONTROL__STRENGTH=3`,
`CDSERVE_VLLM__KV_CACHE_SPACE_GIB=2`, or as JSON, `CDSERVE_CONTROL='{"mode": "token"}'`,
`CDSERVE_REWARDS__HTTP='{"toxicity": "http://127.0.0.1:9000/score"}'`), then defaults. Names follow
one rule (config_flags.py). Any invalid value stops start-up with a message naming the setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdserve import config_flags
from cdserve.config import DEFAULT_SCORER, RENAMED, EngineConfig
from cdserve.config_flags import ENV_PREFIX
from prefix_scorers.base_model import EMBEDDED

BUILTIN_SCORERS = {DEFAULT_SCORER, "untrained"}


class ServerSettings(BaseSettings, EngineConfig):
    """Everything `cdserve serve` can be told: the engine's settings (inherited from EngineConfig,
    not repeated here) and the HTTP layer's."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__",
                                      extra="forbid", validate_default=True)

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

    @model_validator(mode="before")
    @classmethod
    def _no_renamed_environment(cls, data: Any) -> Any:
        # pydantic-settings ignores variables it does not know: an old name would silently do nothing
        renamed = config_flags.renamed_env(os.environ, RENAMED)
        if renamed:
            raise ValueError("; ".join(renamed))
        return data

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
        return self

    def engine_config(self) -> EngineConfig:
        """The engine's part, without the HTTP layer's settings."""
        return EngineConfig(**{name: getattr(self, name) for name in EngineConfig.model_fields})


def describe_error(err: ValidationError) -> str:
    """One line per bad setting, naming both its flag and its environment variable."""
    return config_flags.describe_error(err, ServerSettings, env=True)
