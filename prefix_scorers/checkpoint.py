"""Save, load and create scorer checkpoints (a directory: config.json + model.safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prefix_scorers.config import (
    Architecture,
    EmbeddingSpec,
    EnsembleSpec,
    HeadSpec,
    Normalization,
    Provenance,
    ScorerConfig,
    TokenizerSpec,
)
from prefix_scorers.fingerprint import embedding_fingerprint, tokenizer_fingerprint
from prefix_scorers.model import PrefixScorer


class FingerprintMismatch(ValueError):
    """The scorer was trained with another tokenizer or embedding than the base model has."""


def save_scorer(scorer: PrefixScorer, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = scorer.config.model_copy(deep=True)
    cfg.normalization = Normalization(mean=scorer.norm_mean.tolist(), std=scorer.norm_std.tolist())
    state = {k: v.detach().cpu().contiguous() for k, v in scorer.state_dict().items()
             if k not in ("norm_mean", "norm_std")}  # statistics live in config.json
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg.save(directory)
    return directory


def load_scorer(directory: str | Path, tokenizer=None, base_embedding: torch.Tensor | None = None,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                base_name: str = "the base model") -> PrefixScorer:
    """Load a checkpoint, refusing one whose tokenizer (or embedding) fingerprint differs from the
    base model's. `tokenizer` is the base model's tokenizer; `base_embedding` its input embedding,
    needed when the scorer reuses it."""
    directory = Path(directory)
    cfg = ScorerConfig.load(directory)
    if tokenizer is not None:
        fp = tokenizer_fingerprint(tokenizer)
        if fp != cfg.tokenizer.fingerprint:
            raise FingerprintMismatch(
                f"scorer {directory} was trained with tokenizer {cfg.tokenizer.name or '?'} "
                f"(fingerprint {cfg.tokenizer.fingerprint}) but {base_name} has tokenizer "
                f"fingerprint {fp}: train or pick a scorer for this base model")
    if cfg.embedding.source == "base":
        if base_embedding is None:
            raise ValueError(f"scorer {directory} reuses the base model's embedding: pass base_embedding")
        fp = embedding_fingerprint(base_embedding)
        if cfg.embedding.fingerprint and fp != cfg.embedding.fingerprint:
            raise FingerprintMismatch(
                f"scorer {directory} expects base embedding {cfg.embedding.fingerprint} but "
                f"{base_name} has embedding {fp}: the scorer was trained for another base model")
    scorer = PrefixScorer(cfg, base_embedding)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no weights at {weights}")
    try:
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types, or OSError)
        raise ValueError(f"scorer weights {weights} cannot be read ({type(e).__name__}: {e}): the file "
                         "is truncated or corrupt. Copy the checkpoint folder again, re-export it "
                         "(`prefix-scorers export`), or pass another --scorer") from None
    rows, want = state.get("head_proj", torch.empty(0)).shape[:1], len(cfg.heads) * cfg.ensemble_size
    if tuple(rows) != (want,):
        raise ValueError(f"scorer weights in {weights} hold {tuple(rows)} head projections, config.json "
                         f"asks for {want} ({len(cfg.heads)} heads x ensemble of {cfg.ensemble_size}): "
                         "config.json and model.safetensors come from different checkpoints")
    missing, unexpected = scorer.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("norm_mean", "norm_std")]
    if missing or unexpected:
        raise ValueError(f"scorer weights in {weights} do not match config.json: "
                         f"missing {missing}, unexpected {unexpected}")
    return scorer.to(device=device, dtype=dtype).eval().requires_grad_(False)


DEFAULT_HEADS = [  # formulas: prefix_scorers/rewards/builtin.py
    HeadSpec(name="positive", description="Positive sentiment: VADER compound score in [-1, 1].",
             reward="vader_compound", reward_range=(-1.0, 1.0)),
    HeadSpec(name="specific", description="Specific English wording: distinct rare English words (wordfreq "
             "Zipf frequency in (0, 4), not far more frequent in another language) and numbers (at most one per "
             "two English words) per word (3+ letters, numbers, or emoji; at least 12 words); a repeat counts once.",
             reward="specificity_prose", reward_range=(0.0, 1.0)),
    HeadSpec(name="concise", description="Shorter answers score higher: max(0, 1 - tokens / 128).",
             reward="concise_tokens", reward_range=(0.0, 1.0)),
    HeadSpec(name="readable", description="Flesch reading ease, clipped to [0, 100], divided by 100.",
             reward="readable", reward_range=(0.0, 1.0)),
]


def init_from_base(base_model, tokenizer, heads: list[HeadSpec] | None = None, num_layers: int = 4,
                   seed: int = 0, base_name: str = "", embedding_source: str = "base",
                   ensemble: EnsembleSpec | None = None) -> PrefixScorer:
    """A new scorer whose blocks are copies of the first `num_layers` layers of a Llama-family
    base model (a good start: it already reads text the way the base does) and whose heads are
    random (E random projections each with `ensemble`). It is untrained until a training run says
    otherwise in its provenance."""
    torch.manual_seed(seed)
    bc = base_model.config
    heads = heads or DEFAULT_HEADS
    emb = base_model.get_input_embeddings().weight.detach().float()
    theta = (getattr(bc, "rope_parameters", None) or {}).get("rope_theta") or getattr(bc, "rope_theta", 10000.0)
    arch = Architecture(
        vocab_size=emb.shape[0], hidden_size=bc.hidden_size, num_layers=num_layers,
        num_attention_heads=bc.num_attention_heads, num_key_value_heads=bc.num_key_value_heads,
        intermediate_size=bc.intermediate_size, rope_theta=float(theta), rms_norm_eps=bc.rms_norm_eps,
        max_position_embeddings=bc.max_position_embeddings)
    cfg = ScorerConfig(
        architecture=arch,
        embedding=EmbeddingSpec(source=embedding_source, dim=emb.shape[1],
                                fingerprint=embedding_fingerprint(emb) if embedding_source == "base" else ""),
        tokenizer=TokenizerSpec(fingerprint=tokenizer_fingerprint(tokenizer),
                                name=getattr(tokenizer, "name_or_path", "") or base_name),
        heads=heads, normalization=Normalization.identity(len(heads)), ensemble=ensemble,
        provenance=Provenance(trained=False, base_model=base_name, seed=seed,
                              note=f"untrained: first {num_layers} base layers, random heads"))
    scorer = PrefixScorer(cfg, emb if embedding_source == "base" else None)
    if embedding_source == "checkpoint":
        scorer.embed.weight.data.copy_(emb)
    base_layers = base_model.model.layers
    for i, block in enumerate(scorer.layers):
        missing, _unexpected = block.load_state_dict(base_layers[i].state_dict(), strict=False)
        if missing:
            raise ValueError(f"base layer {i} is not Llama-shaped: missing {missing}")
    scorer.norm.weight.data.copy_(base_model.model.norm.weight.detach())
    return scorer.eval()


class IdVocabulary:
    """A stand-in tokenizer whose token i is "t{i}": what a scorer over bare token ids (tests,
    experiments) records as its tokenizer."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(self.vocab_size)}


def random_scorer(vocab_size: int, tokenizer, heads: list[HeadSpec], hidden_size: int = 32,
                  num_layers: int = 2, seed: int = 0, embedding: torch.Tensor | None = None,
                  ensemble: EnsembleSpec | None = None) -> PrefixScorer:
    """A small random scorer, for tests and experiments (own embedding unless one is given);
    tokenizer None: IdVocabulary(vocab_size)."""
    tokenizer = IdVocabulary(vocab_size) if tokenizer is None else tokenizer
    torch.manual_seed(seed)
    arch = Architecture(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden_size)
    source = "base" if embedding is not None else "checkpoint"
    cfg = ScorerConfig(
        architecture=arch,
        embedding=EmbeddingSpec(source=source, dim=embedding.shape[1] if embedding is not None else hidden_size,
                                fingerprint=embedding_fingerprint(embedding) if embedding is not None else ""),
        tokenizer=TokenizerSpec(fingerprint=tokenizer_fingerprint(tokenizer)),
        heads=heads, normalization=Normalization.identity(len(heads)), ensemble=ensemble,
        provenance=Provenance(trained=False, seed=seed, note="random weights"))
    return PrefixScorer(cfg, embedding).eval()
