"""Branching rollouts: the base policy's value of several candidate tokens at the same prefix.

Token mode tilts the base distribution by each candidate's advantage Q(s, z) - V(s) (token_signal.py).
A plain rollout samples one token per prefix, so the values of the candidates it did not take are
only inferred from other prompts, and held out they carry a third of the signal token mode needs
(benchmarks/RESULTS.md, "the token signal"). A branch measures them: at a point t of a stored base
rollout y, for each of the `candidates` most likely tokens z at s_t = (x, y_<t) (its stored top-k),
the base model continues s_t + z to the end, and the reward of that continuation is a sample of
Q(s_t, z) = E_base[r | s_t, z]. The candidates of one point share their prefix, so training sees
the same state with several tokens and their rewards side by side.

A branch is stored as a rollout (rollouts.py format) with `roll_in` = t + 1 (its first t + 1 tokens
were not sampled by the base model after its prompt: y_<t from the source rollout, z chosen), so
training values only positions >= t (train.py `Example.base_from`) and the pooled targets
(targets.py) never mix a branch into the source rollout's earlier prefixes; `branch_of` names the
source rollout, and the stored top-k of positions <= t are the source's (same prefixes). Label a
branch run as any other (`prefix-scorers label`) and train on it pooled with its source run.

Points are drawn per source rollout, uniformly among its positions without repetition, seeded by
(seed, rollout id): a resumed run draws the same. Resumable like rollouts.py (rows already written
are skipped, chunks are appended).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from prefix_scorers.prompts import read_jsonl
from prefix_scorers.rollouts import (
    VLLM_CHUNK,
    RolloutConfig,
    eos_token_ids,
    existing_ids,
    load_vllm,
    sample_batch_hf,
    sample_vllm,
)


@dataclass(frozen=True)
class BranchConfig:
    points: int = 2  # branch points per source rollout
    candidates: int = 4  # the most likely stored tokens continued at each point
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # the source run's length, temperature, engine

    def __post_init__(self):
        if self.points < 1 or self.candidates < 1:
            raise ValueError(f"points and candidates must be >= 1, got {self.points} and {self.candidates}")
        if self.rollout.roll_in is not None:
            raise ValueError("branches continue with the base model: no roll-in scorer")


@dataclass(frozen=True)
class Branch:
    source: dict  # the source rollout
    t: int  # response position branched at
    token: int  # the candidate forced at t

    @property
    def id(self) -> str:
        return f"{self.source['id']}@{self.t}:{self.token}"

    def prefix(self) -> list[int]:
        """What the base model continues: prompt, the source's first t tokens, the candidate."""
        return self.source["prompt_ids"] + self.source["response_ids"][: self.t] + [self.token]


def branch_points(source: dict, cfg: BranchConfig) -> list[Branch]:
    """The branches of one source rollout: `points` positions (uniform, distinct, seeded by the
    rollout's id) x its `candidates` most likely stored tokens there."""
    n = min(len(source["response_ids"]), len(source.get("topk_ids", [])))
    if n == 0:
        return []
    rng = random.Random(f"{cfg.rollout.seed}:{source['id']}")
    ts = sorted(rng.sample(range(n), min(cfg.points, n)))
    return [Branch(source, t, z) for t in ts for z in source["topk_ids"][t][: cfg.candidates]]


def budget(branch: Branch, cfg: BranchConfig, eos: set[int]) -> int:
    """Tokens left to sample after the candidate (0: it ended the answer or the length)."""
    return 0 if branch.token in eos else max(0, cfg.rollout.max_new_tokens - branch.t - 1)


def branch_row(branch: Branch, continuation: dict, eos: set[int]) -> dict:
    """The branch as a rollout row (without `text`): the source's prefix and top-k up to t, the
    candidate, then the continuation (a sample_* row: response_ids, finished, topk_ids, topk_logprobs)."""
    src, t = branch.source, branch.t
    return {"id": branch.id, "prompt_id": src["prompt_id"], "prompt": src.get("prompt", ""),
            "prompt_ids": src["prompt_ids"],
            "response_ids": src["response_ids"][:t] + [branch.token] + continuation["response_ids"],
            "finished": branch.token in eos or continuation["finished"],
            "topk_ids": src["topk_ids"][: t + 1] + continuation["topk_ids"],
            "topk_logprobs": src["topk_logprobs"][: t + 1] + continuation["topk_logprobs"],
            "roll_in": t + 1, "branch_of": src["id"], "branch_at": t}


EMPTY = {"response_ids": [], "finished": False, "topk_ids": [], "topk_logprobs": []}


def continue_branches(branches: list[Branch], budgets: list[int], cfg: BranchConfig, eos: set[int],
                      model=None, tokenizer=None, llm=None, seed: int = 0) -> list[dict]:
    """Sample each branch's continuation with the base model (vLLM's `llm` or transformers' `model`)."""
    todo = [i for i, b in enumerate(budgets) if b > 0]
    out = [EMPTY] * len(branches)
    if not todo:
        return out
    prompts = [branches[i].prefix() for i in todo]
    if llm is not None:
        rows = sample_vllm(llm, prompts, cfg.rollout, eos, max_tokens=[budgets[i] for i in todo])
    else:  # one generate call samples to the longest budget; each row keeps its own
        rcfg = replace(cfg.rollout, max_new_tokens=max(budgets[i] for i in todo))
        rows = sample_batch_hf(model, tokenizer, prompts, rcfg, seed, eos)
    for i, row in zip(todo, rows):
        n = budgets[i]
        out[i] = {"response_ids": row["response_ids"][:n], "topk_ids": row["topk_ids"][:n],
                  "topk_logprobs": row["topk_logprobs"][:n],
                  "finished": row["finished"] and len(row["response_ids"]) <= n}
    return out


def generate_branches(model_dir: Path, source_path: Path, out_path: Path, cfg: BranchConfig,
                      limit: int | None = None) -> Path:
    """Branch the first `limit` source rollouts (all: None) -> `out_path` (rollouts.py format)."""
    from prefix_scorers.base_model import load_model, load_tokenizer

    sources = read_jsonl(source_path)[:limit]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = existing_ids(out_path)
    jobs = [b for s in sources for b in branch_points(s, cfg) if b.id not in done]
    if not jobs:
        return out_path
    rc = cfg.rollout
    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    model = None if rc.engine == "vllm" else load_model(model_dir, device=rc.device)
    eos = eos_token_ids(tokenizer, model)
    llm = load_vllm(model_dir, rc.seed * 1_000_003 + len(done), rc.device) if rc.engine == "vllm" else None
    if llm is None:  # hf: similar budgets share a batch (generate samples to the longest)
        jobs.sort(key=lambda b: budget(b, cfg, eos))
    step = VLLM_CHUNK if llm is not None else rc.batch_size
    with open(out_path, "a") as f, tqdm(total=len(jobs), desc="branches", unit="branch") as bar:
        for start in range(0, len(jobs), step):
            batch = jobs[start:start + step]
            budgets = [budget(b, cfg, eos) for b in batch]
            conts = continue_branches(batch, budgets, cfg, eos, model, tokenizer, llm,
                                      seed=rc.seed * 1_000_003 + len(done) + start)
            for b, c in zip(batch, conts):
                row = branch_row(b, c, eos)
                row["text"] = tokenizer.decode(row["response_ids"], skip_special_tokens=True)
                f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update(len(batch))
    return out_path
