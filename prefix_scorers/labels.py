"""Stage 3: score every rollout's text with every reward.

Writes `labels.jsonl`, one line per rollout: `{"id": "p0042-1", "rewards": {"vader_compound": 0.61,
...}}`. Resumable: rollouts already labelled (with every requested reward) are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from prefix_scorers.prompts import read_jsonl
from prefix_scorers.rewards import get_reward


def _merged(rows) -> dict[str, dict[str, float]]:
    """{rollout id: {reward: value}} over the rows of an id (labelling again with other rewards
    appends rows that add them); for a reward in two rows the later one wins."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        out.setdefault(row["id"], {}).update(row["rewards"])
    return out


def labelled_ids(path: Path, rewards: list[str]) -> set[str]:
    """Rollouts with every one of `rewards`, over all their lines (a line cut short by an
    interruption is skipped: that rollout is labelled again)."""
    if not Path(path).is_file():
        return set()

    def rows():
        with open(path) as f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue

    return {i for i, have in _merged(rows()).items() if set(rewards) <= have.keys()}


def label_rollouts(rollouts_path: Path, out_path: Path, rewards: list[str], batch_size: int = 256) -> Path:
    fns = [get_reward(name) for name in rewards]  # fail on an unknown reward before any work
    out_path = Path(out_path)
    done = labelled_ids(out_path, rewards)
    todo = [r for r in read_jsonl(rollouts_path) if r["id"] not in done]
    with open(out_path, "a") as f, tqdm(total=len(todo), desc="labels", unit="rollout") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            texts = [r["text"] for r in batch]
            scores = {fn.name: fn(texts) for fn in fns}
            f.writelines(json.dumps({"id": r["id"], "rewards": {k: v[i] for k, v in scores.items()}}) + "\n" for i, r in enumerate(batch))
            f.flush()
            bar.update(len(batch))
    return out_path


def load_labels(path: Path) -> dict[str, dict[str, float]]:
    """{rollout id: {reward: value}}, merged over the lines of an id (`_merged`)."""
    return _merged(read_jsonl(path))
