"""Reward functions: the true rewards the scorer heads learn to predict (see `builtin` for the
four built-in ones and their formulas, `registry` for adding your own)."""

from prefix_scorers.rewards import builtin  # noqa: F401  (registers the built-in rewards)
from prefix_scorers.rewards.registry import (
    Reward,
    get_reward,
    import_reward_modules,
    list_rewards,
    register_http_reward,
    register_reward,
)

__all__ = ["Reward", "get_reward", "import_reward_modules", "list_rewards", "register_http_reward",
           "register_reward", "score_texts"]


def score_texts(texts, rewards) -> dict[str, list[float]]:
    """Score texts with every named reward: {reward name: [score per text]}."""
    return {name: get_reward(name)(texts) for name in rewards}
