"""The scorer checkpoint's `config.json`, as a validated pydantic model.

A checkpoint is a directory with `config.json` (this model) and `model.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FORMAT_VERSION = 1  # a checkpoint with one value projection per head (what older cdserve reads)
ENSEMBLE_FORMAT_VERSION = 2  # a checkpoint with `ensemble`: E projections per head
FORMAT_VERSIONS = (FORMAT_VERSION, ENSEMBLE_FORMAT_VERSION)


class HeadSpec(BaseModel):
    """One reward the scorer estimates: a named head."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$", description="Head name used in requests.")
    description: str = Field("", description="What a high value of this head means.")
    reward: str = Field("", description="The reward function that trained it (registry name).")
    reward_range: tuple[float, float] = Field((-1.0, 1.0), description="Range of the true reward.")


class Architecture(BaseModel):
    """A small Llama-style causal transformer (RMSNorm, RoPE, GQA, SwiGLU)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["cd-q-transformer"] = "cd-q-transformer"
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    intermediate_size: int = Field(gt=0)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192

    @model_validator(mode="after")
    def _heads_divide(self) -> Architecture:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        return self


class EmbeddingSpec(BaseModel):
    """Where the token embedding E (inputs, and the CD-Q output factor) comes from.

    `base`: the base model's input embedding, frozen; the checkpoint stores only its fingerprint,
    so the scorer adds no vocab-sized parameters. `checkpoint`: an embedding stored in
    model.safetensors (`embed.weight`), for scorers that must stand alone.
    """

    model_config = ConfigDict(extra="forbid")

    source: Literal["base", "checkpoint"] = "base"
    dim: int = Field(gt=0)
    fingerprint: str = Field("", description="Fingerprint of the base embedding (source=base).")


class TokenizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fingerprint: str
    name: str = ""


class Normalization(BaseModel):
    """Per-head, position-aware statistics: value_norm = (value - mean[h][p]) / std[h][p].

    Position p is the index of the generated token (0 = first response token), clipped to the
    last bucket. They make weights comparable across heads with different reward scales.
    """

    model_config = ConfigDict(extra="forbid")

    mean: list[list[float]]
    std: list[list[float]]

    @model_validator(mode="after")
    def _shapes(self) -> Normalization:
        if len(self.mean) != len(self.std) or any(
            len(m) != len(s) or not m for m, s in zip(self.mean, self.std)
        ):
            raise ValueError("normalization.mean and normalization.std must both be [num_heads][P]")
        if any(v <= 0 for row in self.std for v in row):
            raise ValueError("normalization.std must be positive")
        return self

    @classmethod
    def identity(cls, num_heads: int) -> Normalization:
        return cls(mean=[[0.0]] * num_heads, std=[[1.0]] * num_heads)


class EnsembleSpec(BaseModel):
    """E value projections per head on one shared trunk: Q_{h,e}(prefix, z) = <U_{h,e} h, E_z> / sqrt(d_e)
    + b_{h,e}. A head's value is the mean over e, its spread (epistemic uncertainty) the standard
    deviation over e. The weights keep the single-projection names: `head_proj` (H*E, d_e, d) and
    `head_bias` (H*E,), head-major (row h*E + e is member e of head h)."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(ge=2, description="E: value projections per head.")
    method: str = Field("bootstrap-poisson", description="How the members were made to differ "
                        "(bootstrap-poisson: each member weighs each training rollout by its own Poisson(1) draw).")
    prior_scale: float = Field(0.0, ge=0, description="Std of each member's random initial projection, "
                               "relative to the single-projection init (the spread on inputs unlike the data).")


class Provenance(BaseModel):
    model_config = ConfigDict(extra="allow")

    trained: bool = False
    base_model: str = ""
    objective: str = ""
    data_size: int = 0
    seed: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    note: str = ""


class ScorerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    architecture: Architecture
    embedding: EmbeddingSpec
    tokenizer: TokenizerSpec
    heads: list[HeadSpec] = Field(min_length=1)
    normalization: Normalization
    provenance: Provenance = Field(default_factory=Provenance)
    ensemble: EnsembleSpec | None = Field(None, description="Several value projections per head "
                                          "(format_version 2); absent: one per head.")

    @model_validator(mode="after")
    def _consistent(self) -> ScorerConfig:
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate head names in {names}")
        if len(self.normalization.mean) != len(self.heads):
            raise ValueError(
                f"normalization has {len(self.normalization.mean)} heads, config names {len(names)}"
            )
        if self.ensemble is not None and "format_version" not in self.model_fields_set:
            self.format_version = ENSEMBLE_FORMAT_VERSION  # so an older reader refuses it by its version
        if self.format_version not in FORMAT_VERSIONS:
            raise ValueError(
                f"format_version={self.format_version} is not supported (expected one of {FORMAT_VERSIONS}): "
                "this checkpoint needs a newer prefix_scorers"
            )
        if (self.ensemble is not None) != (self.format_version == ENSEMBLE_FORMAT_VERSION):
            raise ValueError(f"format_version={self.format_version} with ensemble={self.ensemble}: version "
                             f"{ENSEMBLE_FORMAT_VERSION} means an ensemble checkpoint, {FORMAT_VERSION} one without")
        return self

    @property
    def ensemble_size(self) -> int:
        """E: value projections per head (1 without an ensemble)."""
        return self.ensemble.size if self.ensemble is not None else 1

    @property
    def head_names(self) -> list[str]:
        return [h.name for h in self.heads]

    def save(self, directory: Path) -> None:
        # without an ensemble, the file is exactly a version-1 config (older readers forbid extra keys)
        skip = {"ensemble"} if self.ensemble is None else None
        (Path(directory) / "config.json").write_text(self.model_dump_json(indent=2, exclude=skip) + "\n")

    @classmethod
    def load(cls, directory: Path) -> ScorerConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no scorer config at {path}: a scorer checkpoint is a "
                                    "directory with config.json and model.safetensors")
        return cls.model_validate(json.loads(path.read_text()))
