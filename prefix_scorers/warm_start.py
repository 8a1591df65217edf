"""Continued training: start a new scorer from a trained checkpoint's weights (`train --init-from`).

The new run builds its scorer as usual (copies of the base model's first layers, random heads) and
then replaces every trained tensor with the checkpoint's: the copied layers, the final norm, and
each head's value projection and bias, matched by head name (the checkpoint may list its heads in
another order). What must agree, each checked with an error that names the difference: the
architecture (depth, widths, RoPE), the heads (same names, each trained on the same reward over
the same range), the ensemble size, and the tokenizer and embedding fingerprints. A head named in
`retarget` may continue on another reward of the same range (`train --retarget-head NAME`): the
way to move a head to a corrected reward (`specificity_english` after steering gamed
`specificity_distinct`) without forgetting what the rest of it learned; the record names it. The optimiser
starts fresh (the checkpoint folder has no optimiser state), so the run has its usual warmup and
cosine decay; the normalisation statistics are recomputed after training.

Weights are loaded in the checkpoint's stored dtype and cast to the new scorer's (float32):
the trainer's own output (`RUN/train/scorer`, float32) continues exactly; a bfloat16 export
continues from its rounded weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from prefix_scorers.config import ScorerConfig
from prefix_scorers.model import PrefixScorer

_HEAD_TENSORS = ("head_proj", "head_bias")  # head-major rows: member e of head h is row h*E + e


def init_from_checkpoint(scorer: PrefixScorer, directory: str | Path, retarget: tuple[str, ...] = ()) -> dict:
    """Copy a trained checkpoint's weights into `scorer` (in place) after checking that both are
    the same model; returns a short record of the source for provenance."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"--init-from {directory}: no config.json there; pass a scorer checkpoint "
                                "folder such as RUN/train/scorer")
    src = ScorerConfig.load(directory)
    want = scorer.config
    _check_same_model(src, want, directory, retarget)
    state = load_file(str(directory / "model.safetensors"))
    E = want.ensemble_size
    order = [src.head_names.index(h.name) * E + e for h in want.heads for e in range(E)]
    own = scorer.state_dict()
    missing = sorted(k for k in own if k not in state and k not in ("norm_mean", "norm_std", "embed_weight"))
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise ValueError(f"--init-from {directory}: its weights do not match this scorer's (missing {missing}, "
                         f"unexpected {unexpected}); it was written by another version of prefix_scorers")
    with torch.no_grad():
        for name, value in state.items():
            if name in _HEAD_TENSORS:
                value = value[order]
            if tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(f"--init-from {directory}: tensor {name} has shape {tuple(value.shape)}, this "
                                 f"scorer's is {tuple(own[name].shape)}")
            own[name].copy_(value.to(own[name].dtype))
    prov = src.provenance
    return {"path": str(directory), "dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
            "trained": prov.trained, "objective": prov.objective, "data_size": prov.data_size,
            "epochs": prov.metrics.get("epochs"), "train_seconds": prov.metrics.get("train_seconds"),
            **({"retargeted": {h.name: {"from": src.heads[src.head_names.index(h.name)].reward, "to": h.reward}
                               for h in want.heads if h.name in retarget}} if retarget else {})}


def _check_same_model(src: ScorerConfig, want: ScorerConfig, directory: Path, retarget: tuple[str, ...] = ()) -> None:
    a, b = src.architecture.model_dump(), want.architecture.model_dump()
    diff = {k: (a[k], b[k]) for k in b if a.get(k) != b[k]}
    if diff:
        hint = " (pass the same --num-layers as the checkpoint)" if "num_layers" in diff else ""
        raise ValueError(f"--init-from {directory}: architecture differs from this run's: "
                         + ", ".join(f"{k} {x} in the checkpoint vs {y} here" for k, (x, y) in diff.items())
                         + hint)
    theirs = {h.name: h for h in src.heads}
    ours = {h.name: h for h in want.heads}
    if set(theirs) != set(ours):
        raise ValueError(f"--init-from {directory}: the checkpoint has heads {sorted(theirs)}, this run trains "
                         f"{sorted(ours)} (missing in the checkpoint: {sorted(set(ours) - set(theirs))}, "
                         f"not trained here: {sorted(set(theirs) - set(ours))}); pass the checkpoint's heads "
                         "with --head name=reward, or train from scratch")
    unknown = sorted(set(retarget) - set(ours))
    if unknown:
        raise ValueError(f"--retarget-head {unknown}: not a head of this run ({sorted(ours)})")
    for name, h in ours.items():
        t = theirs[name]
        if tuple(t.reward_range) != tuple(h.reward_range) or (t.reward != h.reward and name not in retarget):
            raise ValueError(f"--init-from {directory}: head {name!r} was trained on reward {t.reward!r} "
                             f"(range {tuple(t.reward_range)}), this run's is {h.reward!r} "
                             f"(range {tuple(h.reward_range)}): a head continues only on its own reward, or "
                             "on another of the same range with --retarget-head " + name)
    if src.ensemble_size != want.ensemble_size:
        raise ValueError(f"--init-from {directory}: the checkpoint has {src.ensemble_size} value projection(s) "
                         f"per head, this run {want.ensemble_size} (--ensemble)")
    if src.tokenizer.fingerprint != want.tokenizer.fingerprint:
        raise ValueError(f"--init-from {directory}: trained with tokenizer fingerprint {src.tokenizer.fingerprint}, "
                         f"this base model's is {want.tokenizer.fingerprint}: pick a checkpoint of this base model")
    if (src.embedding.source, src.embedding.fingerprint) != (want.embedding.source, want.embedding.fingerprint):
        raise ValueError(f"--init-from {directory}: embedding {src.embedding.source}/{src.embedding.fingerprint} "
                         f"differs from this run's {want.embedding.source}/{want.embedding.fingerprint}: "
                         "pick a checkpoint of this base model")
