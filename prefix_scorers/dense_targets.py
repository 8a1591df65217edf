"""The `dense` value target (`train --target dense`): every prefix's target mixes the final reward
with a reward-to-go built from segment labels (`prefix_scorers.segment_labels`).

Notation, for one rollout and one head: segments k = 0..K-1 (token spans), final reward r, segment
labels l_k, their location-aware normaliser (mean m_k, std s_k at segment k's first token, fitted
on the training rollouts: `prefix_scorers.location_norm`) and normalised labels
z_k = clip((l_k - m_k) / s_k, -clip, clip) (a missing label: z_k = 0, the location's mean).
In reward units a segment's surprise is u_k = a_k z_k, with

- source `reward` (the head's own reward on prefixes): l_k is the reward increment
  d_k = R(text to the end of segment k) - R(text before it), and a_k = s_k, so u_k = d_k - m_k (up
  to clipping): how much more the segment added than segments at that place usually do;
- source `critic` (a critic model's rating of each segment for the head's quality): ratings are
  on the critic's scale, so a_k = b, the least-squares slope of r on sum_k z_k over the training
  rollouts (clipped at 0: a critic that disagrees with the reward adds nothing).

For a response token in segment k, the target is

    target = r - lambda * sum_{j > k} u_j
           = (1 - lambda) * r + lambda * (R(y up to segment k's end) + sum_{j > k} m_j)   (reward source)

i.e. a mix of the final reward and a reward-to-go estimate from the segment labels: the reward
earned by the end of the current segment plus what segments at the remaining locations add on
average. The segment's own increment stays in the target (its tokens are being chosen), the
future segments' surprises are shrunk by lambda. lambda = 0 is CD-FUDGE; at the last segment
the target is r exactly for every lambda, so the value of a finished answer still estimates the
final reward. Why it can help: CD-FUDGE's minimiser E[r | prefix] is right, but r's noise from
segments not yet written is the same size at every early prefix; replacing part of it by its
location mean cuts target variance where the future is long. The price is bias where future
surprises depend on the prefix (VADER saturates: a glowing opening leaves less to add), which is
why lambda < 1 and why the comparison on held-out prompts (prefix_scorers/README.md) decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from prefix_scorers.config import HeadSpec
from prefix_scorers.location_norm import LocationNormalizer, save_normalizers
from prefix_scorers.segment_labels import CRITIC_PREFIX, load_segment_labels, located, source_labels

DENSE_SOURCES = ("reward", "critic")


def label_source(head: HeadSpec, source: str) -> str:
    if source not in DENSE_SOURCES:
        raise ValueError(f"dense source must be one of {DENSE_SOURCES}, got {source!r}")
    return head.reward if source == "reward" else CRITIC_PREFIX + head.name


def dense_targets(ids: Sequence[str], lengths: Sequence[int], rewards, heads: Sequence[HeadSpec],
                  rows: dict[str, dict], source: str = "reward", lam: float = 0.5, clip: float = 3.0,
                  **norm_kw) -> tuple[list[np.ndarray], dict]:
    """Per rollout an (L_i, H) array of targets, and a summary (normalisers, scales, coverage).

    ids, lengths (N,): the training rollouts and their response lengths; rewards (N, H) final
    rewards; rows: segment label rows by id. A rollout without a row (or whose spans do not tile
    its response) and a head without labels of `source` keep the final reward as target."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"dense lambda must be in [0, 1] (0: final reward only), got {lam}")
    rewards = np.asarray(rewards, dtype=np.float64)
    out = [np.repeat(rewards[i][None], n, 0) for i, n in enumerate(lengths)]
    usable = [rows.get(i) if rows.get(i) and rows[i]["spans"] and rows[i]["spans"][-1][1] == n else None
              for i, n in zip(ids, lengths)]
    summary: dict = {"source": source, "lambda": lam, "clip": clip,
                     "rollouts_with_segments": sum(u is not None for u in usable), "rollouts": len(ids),
                     "heads": {}}
    for h, head in enumerate(heads):
        src = label_source(head, source)
        labelled = [(i, row, lab) for i, row in enumerate(usable)
                    if row is not None and (lab := source_labels(row, src)) is not None]
        if not any(v is not None for _, _, lab in labelled for v in lab):
            summary["heads"][head.name] = {"label_source": src, "used": False}
            continue
        norm = LocationNormalizer(**norm_kw).fit(t for _, row, lab in labelled for t in located(row, lab))
        z = {i: np.array([0.0 if v is None else float(np.clip(norm.normalize(k, s, v), -clip, clip))
                          for k, s, v in located(row, lab)]) for i, row, lab in labelled}
        if source == "reward":
            scale = {i: np.array([norm.moments(k, span[0])[1] for k, span in enumerate(row["spans"])])
                     for i, row, _ in labelled}
            slope = None
        else:
            sums = np.array([z[i].sum() for i, _, _ in labelled])
            r = rewards[[i for i, _, _ in labelled], h]
            var = sums.var()
            slope = max(0.0, float(((sums - sums.mean()) * (r - r.mean())).mean() / var)) if var > 0 else 0.0
            scale = {i: np.full(len(z[i]), slope) for i, _, _ in labelled}
        shifts = []
        for i, row, _ in labelled:
            u = scale[i] * z[i]  # (K,) surprises in reward units
            future = np.concatenate([np.cumsum(u[::-1])[::-1][1:], [0.0]])  # sum_{j>k} u_j
            for (s, e), f in zip(row["spans"], future):
                out[i][s:e, h] = rewards[i, h] - lam * f
            shifts.append(np.abs(out[i][:, h] - rewards[i, h]).mean())
        summary["heads"][head.name] = {
            "label_source": src, "used": True, "rollouts": len(labelled), "slope": slope,
            "mean_abs_shift": round(float(np.mean(shifts)), 5), "normalizer": norm.to_dict()}
    return out, summary


def with_dense_targets(examples: list, heads: Sequence[HeadSpec], segment_labels_path: Path, source: str,
                       lam: float, out_dir: Path | None = None) -> tuple[list, dict]:
    """Training examples (train.Example) with their dense per-position targets. The normalisers
    are fitted on these examples only; with `out_dir`, they are written to `segment_norm.json`
    there. Returns the examples and a summary for the checkpoint's provenance."""
    rows = load_segment_labels(segment_labels_path)
    if not rows:
        raise ValueError(f"--target dense needs segment labels: {segment_labels_path} is missing or empty; run "
                         "`prefix-scorers label --segments clause` (with --critic-url for --dense-source critic)")
    per, summary = dense_targets([e.id for e in examples], [len(e.input_ids) - e.prompt_len for e in examples],
                                 [e.rewards for e in examples], heads, rows, source, lam)
    if not any(h["used"] for h in summary["heads"].values()):
        raise ValueError(f"no head has {source} segment labels in {segment_labels_path}: label with the heads' "
                         "rewards (or a critic for them) first")
    if out_dir is not None:
        save_normalizers({h: LocationNormalizer.from_dict(s["normalizer"]) for h, s in summary["heads"].items()
                          if s["used"]}, Path(out_dir) / "segment_norm.json", source=source, lam=lam,
                         fitted_on=f"{len(examples)} training rollouts")
    compact = {k: v for k, v in summary.items() if k != "heads"} | {
        "heads": {h: {k: v for k, v in s.items() if k != "normalizer"} for h, s in summary["heads"].items()}}
    return [replace(e, targets=t.tolist()) for e, t in zip(examples, per)], compact
