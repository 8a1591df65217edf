"""Loading the prefix scorer next to a vLLM model folder, in the server process or a worker.

vLLM owns the base model, so the scorer's base embedding (when it reuses it) is read straight
from the folder's safetensors instead of loading the model a second time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from prefix_scorers.checkpoint import load_scorer
from prefix_scorers.config import ScorerConfig
from prefix_scorers.model import PrefixScorer

EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def read_input_embedding(model_dir: str | Path) -> torch.Tensor:
    """The base model's input embedding (V, d) from its safetensors files, as float32."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name.endswith(EMBEDDING_SUFFIXES):
                    return st.get_tensor(name).float()
    raise FileNotFoundError(f"no input embedding ({'/'.join(EMBEDDING_SUFFIXES)}) in the safetensors "
                            f"files of {model_dir}")


def load_scorer_for_model(scorer_dir: str | Path, model_dir: str | Path, device: torch.device | str = "cpu",
                          tokenizer=None) -> PrefixScorer:
    """Load a scorer checkpoint for the base model in `model_dir` (fingerprints checked; the
    tokenizer check only where a tokenizer is given: the server process)."""
    cfg = ScorerConfig.load(Path(scorer_dir))
    embedding = read_input_embedding(model_dir) if cfg.embedding.source == "base" else None
    return load_scorer(scorer_dir, tokenizer=tokenizer, base_embedding=embedding, device=device,
                       base_name=Path(model_dir).name)
