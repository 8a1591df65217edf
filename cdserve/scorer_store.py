"""Resolve the `scorer` setting to a checkpoint directory.

'default': the scorer trained for the embedded SmolLM2 and shipped in `prefix_scorers/default/`.
'untrained': a clearly labelled stand-in (the base model's first 2 layers, random heads, seed 0),
built once per base model into the cache. Anything else: a checkpoint directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefix_scorers.checkpoint import init_from_base, save_scorer

log = logging.getLogger(__name__)

SHIPPED_DEFAULT = Path(__file__).resolve().parent.parent / "prefix_scorers" / "default"


def resolve_scorer(spec: str, model_dir: Path, cache_dir: Path, model=None, tokenizer=None) -> Path:
    if spec == "default":
        if (SHIPPED_DEFAULT / "config.json").is_file():
            return SHIPPED_DEFAULT
        log.warning("no trained default scorer is installed: using an UNTRAINED scorer (random heads); "
                    "steering will not follow the head names")
        spec = "untrained"
    if spec == "untrained":
        folder = Path(cache_dir) / "scorers" / f"untrained-{Path(model_dir).name}"
        if not (folder / "config.json").is_file():
            if model is None or tokenizer is None:
                raise ValueError("building the untrained scorer needs the loaded base model")
            scorer = init_from_base(model, tokenizer, num_layers=2, seed=0, base_name=Path(model_dir).name)
            save_scorer(scorer, folder)
        return folder
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"scorer '{spec}' is not 'default', 'untrained' or a checkpoint "
                                "directory (config.json + model.safetensors)")
    return path
