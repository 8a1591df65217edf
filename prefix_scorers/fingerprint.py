"""Fingerprints that tie a scorer to the tokenizer (and, optionally, the embedding) it was trained with."""

from __future__ import annotations

import hashlib
import json

import torch


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary (token -> id) and the special tokens.

    Two tokenizers with the same fingerprint map every text to the same ids, which is what a
    scorer needs: its values are indexed by token id.
    """
    vocab = tokenizer.get_vocab()
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    blob = json.dumps({"vocab": sorted(vocab.items()), "special": special}, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def embedding_fingerprint(weight: torch.Tensor) -> str:
    """sha256 over the embedding rounded to bfloat16.

    Rounding first makes the fingerprint the same whether the base model was loaded in float32
    or bfloat16 (rounding a bfloat16 value to bfloat16 is the identity).
    """
    w = weight.detach().to("cpu", torch.bfloat16).contiguous()
    h = hashlib.sha256(str(tuple(w.shape)).encode())
    h.update(w.view(torch.int16).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]
