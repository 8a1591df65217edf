"""benchmarks/quality.py's own plots, on hand-made runs (no server)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def quality_script():
    spec = importlib.util.spec_from_file_location("quality_script", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(mode: str, weights: dict, **fields) -> dict:
    rewards = dict.fromkeys(("positive", "specific", "concise", "readable"), 0.5)
    return {"mode": mode, "weights": weights, "n": 8, "kl": 0.3, "reward": rewards,
            "reward_sem": dict.fromkeys(rewards, 0.01), **fields}


def test_plain_decoding_and_reward_ranked_runs_alone_draw_no_steering_plot(tmp_path):
    """`--only 'none;block K=2 M=24 reward-ranked'` into a new --out: no head is steered, so there is
    nothing to plot (it raised from matplotlib: a grid of 0 rows)."""
    q = quality_script()
    path = tmp_path / "reward_vs_kl.png"
    q.plot_reward_vs_kl([run("none", {"positive": 1.0})], path)
    assert not path.exists()
    q.plot_reward_vs_kl([run("none", {"positive": 1.0}), run("token", {"positive": 1.0}, strength=2.0, top_k=100)],
                        path)
    assert path.exists()
