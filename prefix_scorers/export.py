"""Stage 5: export a trained scorer as a shippable checkpoint (config.json + model.safetensors).

The trainer writes float32; export casts the weights (bfloat16 by default: half the size, and
`load_scorer` casts back to whatever dtype the server asks for), checks the result loads against
the base model's tokenizer and embedding, and reports its size.

`std_floor` raises the normaliser's std of every head and position to at least `std_floor` x the
head's reward std (provenance.reward_std), what training with that `TrainConfig.std_floor` writes;
it never lowers one. A checkpoint trained with a lower floor is renormalised this way without its
training data: flooring twice is flooring once at the higher value.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prefix_scorers.config import ScorerConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_scorer(src: Path, dst: Path, dtype: str = "bfloat16", max_mb: float | None = None,
                  std_floor: float | None = None) -> Path:
    """Write `dst` (config.json, model.safetensors, and the training run's loss.png if there is one)."""
    src, dst = Path(src), Path(dst)
    cfg = ScorerConfig.load(src)
    if not cfg.provenance.trained:
        raise ValueError(f"{src} is not a trained scorer (provenance.trained is false)")
    if std_floor is not None:
        cfg = floored(cfg, std_floor)
    loss_png = next((f for f in (src / "loss.png", src.parent / "loss.png") if f.is_file()), None)
    state = load_file(str(src / "model.safetensors"))
    state = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "dtype": dtype})
    cfg.provenance = cfg.provenance.model_copy(update={"weights_dtype": dtype})
    cfg.save(tmp)
    if loss_png:  # a re-exported checkpoint keeps its own
        shutil.copy(loss_png, tmp / "loss.png")
    for f in tmp.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; a shipped checkpoint must be readable by any user
    size_mb = (tmp / "model.safetensors").stat().st_size / 1e6
    if max_mb is not None and size_mb > max_mb:
        shutil.rmtree(tmp)
        raise ValueError(f"exported weights are {size_mb:.1f} MB, over the {max_mb} MB limit: "
                         "use fewer layers or a smaller dtype")
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def floored(cfg: ScorerConfig, std_floor: float) -> ScorerConfig:
    """cfg with normalization.std >= std_floor x each head's reward std, recorded in provenance."""
    reward_std = getattr(cfg.provenance, "reward_std", None)
    if not reward_std or len(reward_std) != len(cfg.heads):
        raise ValueError(f"--std-floor {std_floor} needs provenance.reward_std (one per head) in the scorer's "
                         "config.json, which `prefix-scorers train` writes: retrain, or export without --std-floor")
    if std_floor < 0:
        raise ValueError(f"--std-floor {std_floor} must be >= 0 (a share of each head's reward std)")
    std = [[max(v, std_floor * r) for v in row] for row, r in zip(cfg.normalization.std, reward_std)]
    out = cfg.model_copy(deep=True)
    out.normalization = out.normalization.model_copy(update={"std": std})
    out.provenance = out.provenance.model_copy(update={"norm_std_floor": std_floor})
    return out


def check_loads(directory: Path, base_model_dir: Path) -> str:
    """Load the checkpoint as the server would (fingerprints checked); returns a summary line."""
    from prefix_scorers.base_model import load_model, load_tokenizer
    from prefix_scorers.checkpoint import load_scorer

    tok = load_tokenizer(base_model_dir)
    emb = load_model(base_model_dir).get_input_embeddings().weight.detach().float()
    scorer = load_scorer(directory, tok, emb)
    size = (Path(directory) / "model.safetensors").stat().st_size / 1e6
    return (f"{directory}: heads {scorer.config.head_names}, {scorer.parameter_count() / 1e6:.1f}M "
            f"parameters, {size:.1f} MB on disk")
