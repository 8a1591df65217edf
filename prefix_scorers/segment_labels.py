"""Stage 3b (`prefix-scorers label --segments clause`): a label for every segment of every rollout.

Writes `segment_labels.jsonl`, one line per rollout:

    {"id": "p0042-1", "unit": "clause", "spans": [[0, 9], [9, 21], ...], "texts": [...],
     "empty": {"vader_compound": 0.0, ...}, "prefix": {"vader_compound": [0.44, 0.51, ...], ...},
     "critic": {"positive": [7, null, ...]}, "critic_replies": {"positive": "..."}}

`spans` are response-token spans [start, end) from `prefix_scorers.segments`. For every reward
that scores partial text (all built-in ones do), `prefix[r][k]` is the reward of the answer's text
up to the end of segment k and `empty[r]` that of the empty text; the last prefix is the whole
answer, so `prefix[r][-1]` is the rollout's final reward.

**A segment's label is its reward increment** `d_k = prefix[k] - prefix[k-1]` (`prefix[-1] =
empty`), not the prefix reward: both seeds treat segment rewards as the contribution of each
segment to the return (seed 001 aggregates segment rewards into the sequence's score; seed 002 adds
the critic's span rewards to the environment reward), and increments are what sum to the final
reward (`empty + sum_k d_k = final`), so the reward still to come after segment k is
`sum_{j>k} d_j`. Prefix rewards are kept in the file because increments follow from them.

With a critic (`--critic-url`), `critic[head][k]` is the critic's rating of segment k for the
quality that head rewards (`prefix_scorers.critic`; None: missing). Its raw reply is kept for audit.

After labelling, the location-aware normalisers of every label source (each reward's increments,
each critic head's ratings; `prefix_scorers.location_norm`) fitted on the run's rollouts go to
`segment_norm.json` beside the labels. The run's rollouts are all of the training prompt split;
`train --targets dense` refits on its own training rollouts only, so held-out rollouts never shape
a target. Resumable like `label`: rollouts whose row has every requested label are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from prefix_scorers.critic import Critic
from prefix_scorers.location_norm import LocationNormalizer, save_normalizers
from prefix_scorers.prompts import read_jsonl
from prefix_scorers.rewards import get_reward
from prefix_scorers.segments import Unit, segment_response

CRITIC_PREFIX = "critic:"  # label source names: a reward's name, or "critic:<head>"


@dataclass(frozen=True)
class SegmentConfig:
    unit: Unit = "clause"
    min_tokens: int = 2  # shorter segments join the next one
    max_tokens: int = 24  # longer ones split at a word start
    batch_size: int = 64  # rollouts per write (and per critic batch)


def row_done(row: dict, unit: str, rewards: list[str], critic_heads: list[str]) -> bool:
    return (row.get("unit") == unit and all(r in row.get("prefix", {}) for r in rewards)
            and all(h in row.get("critic", {}) for h in critic_heads))


def load_segment_labels(path: Path) -> dict[str, dict]:
    """{rollout id: row}; a later line for the same id wins, a line cut short is skipped."""
    out = {}
    if not Path(path).is_file():
        return out
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[row["id"]] = row
    return out


def segment_rollouts(rollouts_path: Path, out_path: Path, tokenizer, rewards: list[str], cfg: SegmentConfig,
                     critic: Critic | None = None, critic_heads: dict[str, str] | None = None) -> Path:
    """Label every rollout's segments with each reward (and the critic, for `critic_heads`:
    {head name: the quality it rewards, in words})."""
    fns = [get_reward(name) for name in rewards]  # fail on an unknown reward before any work
    critic_heads = critic_heads or {}
    if critic_heads and critic is None:
        raise ValueError("critic heads were given without a critic endpoint: pass --critic-url")
    out_path = Path(out_path)
    done = {i for i, r in load_segment_labels(out_path).items() if row_done(r, cfg.unit, rewards, list(critic_heads))}
    todo = [r for r in read_jsonl(rollouts_path) if r["id"] not in done and r["response_ids"]]
    with open(out_path, "a") as f, tqdm(total=len(todo), desc="segment labels", unit="rollout") as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            rows = [_segment_row(r, tokenizer, cfg) for r in batch]
            _reward_labels(rows, [r["response_ids"] for r in batch], tokenizer, fns)
            if critic_heads:
                _critic_labels(rows, [r["prompt"] for r in batch], critic, critic_heads)
            f.writelines(json.dumps(row) + "\n" for row in rows)
            f.flush()
            bar.update(len(batch))
    if critic is not None:
        print(critic.stats.summary())
    rows = list(load_segment_labels(out_path).values())
    sources = list(rewards) + [CRITIC_PREFIX + h for h in critic_heads]
    save_normalizers(fit_normalizers(rows, sources), out_path.with_name("segment_norm.json"),
                     fitted_on=f"{len(rows)} rollouts of {Path(rollouts_path).name}", unit=cfg.unit)
    return out_path


def _segment_row(rollout: dict, tokenizer, cfg: SegmentConfig) -> dict:
    segs = segment_response(rollout["response_ids"], tokenizer, cfg.unit, cfg.min_tokens, cfg.max_tokens)
    return {"id": rollout["id"], "unit": cfg.unit, "spans": [[s.start, s.end] for s in segs],
            "texts": [s.text for s in segs], "empty": {}, "prefix": {}, "critic": {}, "critic_replies": {}}


def _reward_labels(rows: list[dict], response_ids: list[list[int]], tokenizer, fns) -> None:
    """prefix[r][k] = reward(text up to the end of segment k), in one batched call per reward."""
    texts, owners = [], []
    for i, (row, ids) in enumerate(zip(rows, response_ids)):
        for _, end in row["spans"]:
            texts.append(tokenizer.decode(ids[:end], skip_special_tokens=True))
            owners.append(i)
    for fn in fns:
        empty = fn([""])[0]
        scores = fn(texts)
        for row in rows:
            row["empty"][fn.name] = empty
            row["prefix"][fn.name] = []
        for i, s in zip(owners, scores):
            rows[i]["prefix"][fn.name].append(s)


def _critic_labels(rows: list[dict], prompts: list[str], critic: Critic, heads: dict[str, str]) -> None:
    items = [(p, row["texts"], quality) for quality in heads.values() for row, p in zip(rows, prompts)]
    results = critic.rate(items)
    for h, head in enumerate(heads):
        for i, row in enumerate(rows):
            ratings, reply = results[h * len(rows) + i]
            row["critic"][head] = ratings
            row["critic_replies"][head] = reply


def source_labels(row: dict, source: str) -> list[float | None] | None:
    """The per-segment labels of one source in one row (None: the row has none): a reward's
    increments, or a critic head's ratings."""
    if source.startswith(CRITIC_PREFIX):
        return row.get("critic", {}).get(source[len(CRITIC_PREFIX):])
    prefix = row.get("prefix", {}).get(source)
    if prefix is None:
        return None
    before = [row["empty"][source], *prefix[:-1]]
    return [p - b for p, b in zip(prefix, before)]


def located(row: dict, labels: list[float | None]) -> list[tuple[int, int, float | None]]:
    """(segment index, first token, label) triples: what a location normaliser reads."""
    return [(k, span[0], v) for k, (span, v) in enumerate(zip(row["spans"], labels))]


def fit_normalizers(rows: list[dict], sources: list[str], **norm_kw) -> dict[str, LocationNormalizer]:
    out = {}
    for source in sources:
        triples = [t for row in rows if (labels := source_labels(row, source)) is not None
                   for t in located(row, labels)]
        if any(v is not None for _, _, v in triples):
            out[source] = LocationNormalizer(**norm_kw).fit(triples)
    return out
