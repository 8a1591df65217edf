"""Stage 4: train every head of a prefix scorer jointly on labelled rollouts.

Notation: a rollout is a prompt x and a response y_1..y_L sampled from the base model, with a
true reward r_h per head. Q_h(x, y_<t, y_t) is read at position t-1, at the token taken.

- CD-FUDGE (`--objective fudge`): regress every prefix's value onto the final reward,
      loss = mean_t sum_h (Q_h(x, y_<t, y_t) - r_h)^2 / var(r_h).
  Its minimiser is E[r_h | x, y_<=t] under the base model: the value CD needs.
- CD-Q (`--objective cdq`): Bellman targets. The value of a prefix is the base model's
  expectation of the next position's values:
      target_t = sum_z p_base(z | x, y_<=t) * stopgrad(Q_h(x, y_<=t, z))   for t < L,
      target_L = r_h,
  with the expectation over the `store_top_k` most likely next tokens recorded with the rollout
  (renormalised). Same squared loss, same per-head scaling.

Value targets and losses (`--target final|mean|soft`, `--soft-eta`, `--loss mse|bce`; fudge
only) are defined in `prefix_scorers/targets.py`: `final` is the CD-FUDGE target above, `mean`
and `soft` pool the rollouts of a prompt that share a prefix, `bce` is a cross-entropy loss for
bounded rewards. Held-out evaluation on another run's rollouts: `eval_rollouts`/`eval_labels`
(the CLI's `--eval-run-dir`, e.g. rollouts of the 94 eval prompts) instead of a prompt split.
`--target dense` (`--dense-source`, `--dense-lambda`) mixes the final reward with a reward-to-go
from segment labels (`label --segments`): `prefix_scorers/dense_targets.py`.

Ensemble heads (`--ensemble E`): each head gets E value projections on the shared trunk; member e
weighs training rollout i by its own count w_{i,e} ~ Poisson(1), drawn once per run (the online
bootstrap: for many rollouts, Poisson(1) counts are what resampling n of n with replacement gives
each one, and they need no fixed data order). The unit resampled is the rollout, not the token:
the tokens of one rollout share its single reward draw, so resampling tokens would pretend 48
correlated regressions are independent and shrink the spread. Members also start from different
random projections (scale `ensemble_prior` x the single-projection init), so they disagree where
the data does not pin them down. Poisson rather than Bernoulli(0.5) masks: every member sees all
the data in expectation, so each is as good a value estimate as a single head.

Dividing by var(r_h) (over the training rollouts) weighs heads with different reward scales
equally. After training, per-head position-aware normalisation statistics (mean and std of the
value at the taken token, by generated-token position) are computed over the training rollouts
and written to the checkpoint with provenance. Train/eval loss curves go to `loss.png`.

Resumable: `train_state.pt` is written after each epoch and a rerun continues from it.
Continued training (`init_from`, the CLI's `--init-from DIR`): the scorer starts from a trained
checkpoint's weights instead of fresh heads (prefix_scorers/warm_start.py checks that it is the same
model: architecture, heads by name and reward, ensemble, fingerprints); the optimiser, warmup and
cosine decay start afresh.
Scale-out: run the same command under `torchrun --nproc_per_node N` or `accelerate launch`
(both set WORLD_SIZE/RANK): each process takes every N-th batch, gradients are averaged with DDP,
and rank 0 writes the outputs (see prefix_scorers/README.md).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prefix_scorers.checkpoint import DEFAULT_HEADS, init_from_base, save_scorer
from prefix_scorers.config import EnsembleSpec, HeadSpec, Provenance
from prefix_scorers.dense_targets import DENSE_SOURCES, with_dense_targets
from prefix_scorers.labels import load_labels
from prefix_scorers.model import PrefixScorer
from prefix_scorers.prompts import read_jsonl
from prefix_scorers.ranking import held_out_ranking
from prefix_scorers.targets import LOSSES, TARGETS, prefix_targets, value_loss
from prefix_scorers.warm_start import init_from_checkpoint

OBJECTIVES = ("fudge", "cdq")
R2_POSITIONS = (8, 24)  # also reported: R^2 of the value after this many generated tokens vs the final reward


@dataclass
class TrainConfig:
    objective: str = "fudge"
    target: str = "final"  # fudge: what each prefix regresses onto (prefix_scorers/targets.py)
    soft_eta: float = 1.0  # soft target: eta per head = soft_eta * std(r_h)
    loss: str = "mse"  # "mse" | "bce" (bounded rewards)
    dense_source: str = "reward"  # target "dense": segment labels from the heads' rewards or a critic
    dense_lambda: float = 0.5  # target "dense": weight of the segment-label reward-to-go (dense_targets.py)
    state_weight: float = 0.0  # weight of the state-value term (batch_loss): sum_z p(z) Q(s, z) regressed
    # onto the same target as Q(s, y), so the values of the candidates token mode compares are trained too
    final_weight: float = 0.0  # share of the loss on the finished answer's value (the one best-of-N and
    # block selection rank by); the rest is the mean over every prefix (0: every position alike)
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-4  # copied transformer layers
    head_lr: float = 1e-3  # the per-head projections U_h and biases b_h
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    num_layers: int = 2
    eval_fraction: float = 0.1  # rollouts of this share of prompts are held out for the eval loss
    eval_every: int = 25  # steps between eval-loss points
    norm_positions: int = 48  # P: buckets of the normalisation statistics
    # std >= std_floor * std(r_h). Where rollouts end (norm_positions) every rollout still running is
    # cut at the same length, so a length-driven value (concise) has almost no spread there, and
    # serving reads that last bucket up to max_tokens: at 0.1 concise's late std was 0.22 of its
    # reward std, and token mode at the default strength spent 20 nats of KL on it (0.5: 9.9,
    # answers still 0.64x as long; benchmarks/RESULTS.md).
    std_floor: float = 0.5
    seed: int = 0
    ensemble: int = 1  # E value projections per head, each on its own bootstrap resample (1: none)
    ensemble_prior: float = 1.0  # members' random initial projections, x the single-projection init
    device: str = "cpu"
    base_model: str = "smollm2"
    init_from: str | None = None  # continue from this trained checkpoint's weights (warm_start.py)
    retarget: tuple[str, ...] = ()  # heads that continue from init_from on another reward (same range)
    heads: list[dict] = field(default_factory=lambda: [h.model_dump() for h in DEFAULT_HEADS])

    def __post_init__(self):
        if self.retarget and not self.init_from:
            raise ValueError(f"retarget {list(self.retarget)} (--retarget-head) moves a head of the --init-from "
                             "checkpoint to another reward: pass --init-from too, or drop --retarget-head")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.target not in (*TARGETS, "dense"):
            raise ValueError(f"target must be one of {(*TARGETS, 'dense')}, got {self.target!r}")
        if self.dense_source not in DENSE_SOURCES or not 0 <= self.dense_lambda <= 1:
            raise ValueError(f"dense_source must be one of {DENSE_SOURCES} and dense_lambda in [0, 1], got "
                             f"{self.dense_source!r} and {self.dense_lambda}")
        if self.target != "final" and self.objective != "fudge":
            raise ValueError(f"target {self.target!r} is a CD-FUDGE target: use --objective fudge (CD-Q "
                             "bootstraps from its own next values)")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0 <= self.final_weight < 1:
            raise ValueError(f"final_weight must be in [0, 1) (the loss share of the last position), got "
                             f"{self.final_weight}")
        if self.state_weight < 0:
            raise ValueError(f"state_weight must be >= 0 (0: no state-value term), got {self.state_weight}")
        if self.state_weight and self.objective != "fudge":
            raise ValueError("state_weight is a CD-FUDGE term (a regression onto the reward): use --objective fudge")
        if self.soft_eta <= 0:
            raise ValueError(f"soft_eta must be > 0 (the soft value's temperature), got {self.soft_eta}")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be >= 1 (1: one projection per head), got {self.ensemble}")


# -- data ---------------------------------------------------------------------------------------
@dataclass
class Example:
    id: str
    prompt_id: str
    input_ids: list[int]  # prompt + response
    prompt_len: int
    rewards: list[float]  # one per head
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    boot: tuple[float, ...] = (1.0,)  # bootstrap weight per ensemble member (one: every member 1)
    targets: list[list[float]] | None = None  # (L, H) per response position; None: the final rewards
    roll_in: int = 0  # response tokens not continued by the base model: an on-policy round's roll-in
    # (roll_in.py) or a branch's prefix and forced candidate (branches.py)

    @property
    def base_from(self) -> int:
        """The first response position whose value the reward samples (the base model continued it)."""
        return max(0, self.roll_in - 1)


def load_examples(rollouts_path: Path, labels_path: Path, heads: list[HeadSpec]) -> list[Example]:
    labels = load_labels(labels_path)
    out = []
    for r in read_jsonl(rollouts_path):
        if r["id"] not in labels or not r["response_ids"]:
            continue
        missing = [h.reward for h in heads if h.reward not in labels[r["id"]]]
        if missing:
            raise ValueError(f"rollout {r['id']} has no label for {missing}: run the labels stage "
                             f"with those rewards")
        out.append(Example(r["id"], r["prompt_id"], r["prompt_ids"] + r["response_ids"], len(r["prompt_ids"]),
                           [labels[r["id"]][h.reward] for h in heads], r.get("topk_ids", []),
                           r.get("topk_logprobs", []), roll_in=r.get("roll_in", 0)))
    if not out:
        raise ValueError(f"no labelled rollouts in {rollouts_path} / {labels_path}")
    return out


def split_by_prompt(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    prompts = sorted({e.prompt_id for e in examples})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: round(len(prompts) * eval_fraction)])
    return [e for e in examples if e.prompt_id not in held], [e for e in examples if e.prompt_id in held]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    valid: torch.Tensor  # (B, T) bool
    taken: torch.Tensor  # (B, T-1) bool: position j predicts a response token (j+1 >= prompt_len) whose
    # prefix the base model continued (an on-policy rollout's roll-in positions are False)
    last: torch.Tensor  # (B, T-1) bool: position j predicts the last response token
    gen_pos: torch.Tensor  # (B, T-1) long: generated-token index of token j+1 (0 = first)
    rewards: torch.Tensor  # (B, H)
    next_ids: torch.Tensor | None  # (B, T-1, k): top-k tokens after token j+1 (CD-Q)
    next_probs: torch.Tensor | None  # (B, T-1, k): their base probabilities, renormalised
    boot: torch.Tensor | None = None  # (B, E) or (B, 1): each rollout's weight per ensemble member
    targets: torch.Tensor | None = None  # (B, T-1, H): each position's FUDGE target (targets.py)
    cand_ids: torch.Tensor | None = None  # (B, T-1, k): top-k tokens position j chooses among (token j+1's
    # own distribution; the state-value term)
    cand_probs: torch.Tensor | None = None  # (B, T-1, k): their sampling probabilities, renormalised


def collate(examples: list[Example], pad_id: int, device: str, with_next: bool, with_cands: bool = False) -> Batch:
    B, T = len(examples), max(len(e.input_ids) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    taken = torch.zeros(B, T - 1, dtype=torch.bool)
    last = torch.zeros(B, T - 1, dtype=torch.bool)
    gen_pos = torch.zeros(B, T - 1, dtype=torch.long)
    k = len(examples[0].topk_ids[0]) if (with_next or with_cands) and examples[0].topk_ids else 1
    next_ids = torch.zeros(B, T - 1, k, dtype=torch.long)
    next_lp = torch.full((B, T - 1, k), -1e4)
    cand_ids, cand_lp = torch.zeros(B, T - 1, k, dtype=torch.long), torch.full((B, T - 1, k), -1e4)
    for b, e in enumerate(examples):
        n, s = len(e.input_ids), e.prompt_len
        ids[b, :n] = torch.tensor(e.input_ids)
        valid[b, :n] = True
        # values of base-policy prefixes only: response positions >= base_from (the last one always: the
        # whole answer's value is its reward under any policy)
        taken[b, s - 1 + max(0, min(e.base_from, n - s - 1)):n - 1] = True
        last[b, n - 2] = True
        gen_pos[b, s - 1:n - 1] = torch.arange(n - s)
        if with_next and n - s > 1:
            # position j = s-1+t predicts y_t; its successor's distribution is topk[t+1]
            next_ids[b, s - 1:n - 2] = torch.tensor(e.topk_ids[1:n - s])
            next_lp[b, s - 1:n - 2] = torch.tensor(e.topk_logprobs[1:n - s])
        if with_cands:  # position j = s-1+t chooses y_t among topk[t]
            cand_ids[b, s - 1:n - 1] = torch.tensor(e.topk_ids[:n - s])
            cand_lp[b, s - 1:n - 1] = torch.tensor(e.topk_logprobs[:n - s])
    rewards = torch.tensor([e.rewards for e in examples], dtype=torch.float32)
    targets = rewards[:, None, :].repeat(1, T - 1, 1)  # (B, T-1, H)
    for b, e in enumerate(examples):
        if e.targets is not None:
            s = e.prompt_len
            targets[b, s - 1:s - 1 + len(e.targets)] = torch.tensor(e.targets, dtype=torch.float32)
    dev = lambda t: t.to(device)
    boot = torch.tensor([e.boot for e in examples], dtype=torch.float32)
    return Batch(dev(ids), dev(valid), dev(taken), dev(last), dev(gen_pos), dev(rewards),
                 dev(next_ids) if with_next else None,
                 dev(torch.softmax(next_lp, dim=-1)) if with_next else None, dev(boot), dev(targets),
                 dev(cand_ids) if with_cands else None, dev(torch.softmax(cand_lp, dim=-1)) if with_cands else None)


def bootstrap(examples: list[Example], ensemble: int, seed: int) -> list[Example]:
    """The examples with a Poisson(1) weight per ensemble member each (see the module docstring)."""
    if ensemble == 1:
        return examples
    counts = torch.poisson(torch.ones(len(examples), ensemble), generator=torch.Generator().manual_seed(seed))
    return [replace(e, boot=tuple(c)) for e, c in zip(examples, counts.tolist())]


def batches(examples: list[Example], batch_size: int, seed: int, shuffle: bool) -> list[list[Example]]:
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    else:  # similar lengths together: less padding
        order.sort(key=lambda i: len(examples[i].input_ids))
    return [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


# -- objectives ---------------------------------------------------------------------------------
def taken_values(scorer: PrefixScorer, queries: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Q of the token actually taken next, per member: queries (B, T, H*E, d_e) -> (B, T-1, H*E)."""
    e = F.embedding(input_ids[:, 1:], scorer.embedding).to(queries.dtype)  # (B, T-1, d_e)
    return torch.einsum("bthe,bte->bth", queries[:, :-1], e) + scorer.head_bias


def candidate_values(scorer: PrefixScorer, queries: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Q(s, z) of each position's stored top-k candidates z (batch.cand_ids), per member:
    queries (B, T, H*E, d_e) -> (B, T-1, H*E, k)."""
    e = F.embedding(batch.cand_ids, scorer.embedding).to(queries.dtype)  # (B, T-1, k, d_e)
    return torch.einsum("bthe,btke->bthk", queries[:, :-1], e) + scorer.head_bias[:, None]


def state_values(scorer: PrefixScorer, queries: torch.Tensor, batch: Batch) -> torch.Tensor:
    """V(s) = sum_z p(z | s) Q(s, z) over each position's stored top-k candidates, per member:
    queries (B, T, H*E, d_e) -> (B, T-1, H*E)."""
    q = candidate_values(scorer, queries, batch)
    return (q * batch.cand_probs[:, :, None, :].to(q.dtype)).sum(-1)


def targets(scorer: PrefixScorer, queries: torch.Tensor, batch: Batch, objective: str) -> torch.Tensor:
    """Regression targets (B, T-1, H*E) for every position (meaningful where batch.taken); each
    ensemble member bootstraps from its own values under CD-Q."""
    if objective == "fudge" and batch.targets is not None:
        return batch.targets.repeat_interleave(scorer.ensemble_size, -1)  # (B, T-1, H*E)
    final = batch.rewards.repeat_interleave(scorer.ensemble_size, -1)  # (B, H*E)
    final = final[:, None, :].expand(-1, batch.taken.shape[1], -1)  # (B, T-1, H*E)
    if objective == "fudge":
        return final
    with torch.no_grad():
        q_next = queries[:, 1:].detach()  # (B, T-1, H, d_e): the prefix that includes token j+1
        e = F.embedding(batch.next_ids, scorer.embedding).to(q_next.dtype)  # (B, T-1, k, d_e)
        v = torch.einsum("bjhe,bjke->bjhk", q_next, e) + scorer.head_bias[:, None]  # (B, T-1, H*E, k)
        bellman = (v * batch.next_probs[:, :, None, :]).sum(-1)  # (B, T-1, H*E)
    return torch.where(batch.last[..., None], final, bellman)


def batch_loss(scorer, batch: Batch, objective: str, inv_var: torch.Tensor, loss: str = "mse",
               ranges: torch.Tensor | None = None, final_weight: float = 0.0,
               state_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (targets.value_loss: scaled squared error, or cross-entropy on the range-rescaled
    value) averaged over response tokens and summed over heads; also the per-head MSE (H,). An
    ensemble member weighs each rollout by its bootstrap count; a head's loss is its members' mean.
    `ranges` (H, 2): each head's reward range (bce). `final_weight` w: the loss is (1 - w) x the
    mean over response tokens + w x the mean over the last ones (the finished answers' values,
    which rank best-of-N candidates: one position in ~48 gets w of the loss instead of ~2%).
    `state_weight` lam (needs batch.cand_ids): lam x the same loss of the state value
    V(s) = sum_z p(z | s) Q(s, z) over the stored top-k candidates z of each position, against the
    same target. FUDGE alone trains only the taken token's Q, so the candidates' values token mode
    compares (and so the advantage Q(s, z) - V(s) it tilts by) are extrapolated from other contexts;
    E[r | s] = sum_z p(z | s) E[r | s, z] is a second, unbiased regression that ties them together."""
    queries = scorer(batch.input_ids, valid=batch.valid).queries
    inner = scorer.module if hasattr(scorer, "module") else scorer
    H, E = inner.num_heads, inner.ensemble_size
    pred = taken_values(inner, queries, batch.input_ids)  # (B, T-1, H*E)
    target = targets(inner, queries, batch, objective)  # (B, T-1, H*E)
    per = lambda x: x.repeat_interleave(E)  # (H,) -> (H*E,), head-major
    if loss != "mse" and ranges is None:
        raise ValueError("the bce loss needs each head's reward range")
    elem_of = lambda p: (p - target) ** 2 if loss == "mse" else value_loss(
        p, target, loss, per(ranges[:, 0].to(p.device)), per(ranges[:, 1].to(p.device)), per(inv_var))
    elem = elem_of(pred)
    if state_weight:
        if batch.cand_ids is None:
            raise ValueError("the state-value term needs the candidates: collate(..., with_cands=True)")
        elem = elem + state_weight * elem_of(state_values(inner, queries, batch))
    boot = batch.boot.expand(-1, E).repeat(1, H) if batch.boot is not None else elem.new_ones(1, H * E)
    mask = batch.taken[..., None].float() * boot[:, None, :]  # (B, T-1, H*E)
    if final_weight:
        n_all, n_last = mask.sum((0, 1), keepdim=True), (mask * batch.last[..., None]).sum((0, 1), keepdim=True)
        mask = mask * ((1 - final_weight) + batch.last[..., None] * final_weight * n_all / n_last.clamp(min=1))
    denom = mask.sum((0, 1)).clamp(min=1)
    per_member = (elem * mask).sum((0, 1)) / denom  # (H*E,)
    per_head = per_member.view(H, E).mean(1)
    if loss == "mse":
        return (per_head * inv_var).sum(), per_head.detach()
    mse = ((((pred - target) ** 2) * mask).sum((0, 1)) / denom).view(H, E).mean(1)
    return per_head.sum(), mse.detach()


# -- statistics -----------------------------------------------------------------------------------
@torch.no_grad()
def value_statistics(scorer: PrefixScorer, examples: list[Example], P: int, batch_size: int, pad_id: int,
                     device: str, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (H, P) of the value at the taken token by generated-token position (positions
    >= P share the last bucket; buckets with fewer than 8 samples copy the previous one)."""
    H = scorer.num_heads
    s1, s2, cnt = torch.zeros(H, P), torch.zeros(H, P), torch.zeros(P)
    for group in batches(examples, batch_size, 0, shuffle=False):
        b = collate(group, pad_id, device, with_next=False)
        v = taken_values(scorer, scorer(b.input_ids, valid=b.valid).queries, b.input_ids)  # (B, T-1, H*E)
        v = scorer.head_values(v, dim=-1).float().cpu()  # (B, T-1, H): the ensemble mean
        pos = b.gen_pos.clamp(max=P - 1).cpu()[b.taken.cpu()]  # (N,)
        v = v[b.taken.cpu()]  # (N, H)
        s1.index_add_(1, pos, v.T)
        s2.index_add_(1, pos, (v**2).T)
        cnt.index_add_(0, pos, torch.ones_like(pos, dtype=torch.float32))
    mean = s1 / cnt.clamp(min=1)
    std = (s2 / cnt.clamp(min=1) - mean**2).clamp(min=0).sqrt()
    for p in range(P):
        if cnt[p] < 8 and p > 0:
            mean[:, p], std[:, p] = mean[:, p - 1], std[:, p - 1]
    return mean, torch.maximum(std, floor[:, None]).clamp(min=1e-6)


@torch.no_grad()
def evaluate(scorer, examples: list[Example], cfg: TrainConfig, pad_id: int, inv_var: torch.Tensor,
             objective: str | None = None, ranges: torch.Tensor | None = None,
             loss: str | None = None) -> tuple[float, torch.Tensor]:
    total, per_head, n = 0.0, torch.zeros_like(inv_var), 0
    inv_var_dev = inv_var.to(cfg.device)
    for group in batches(examples, cfg.batch_size, 0, shuffle=False):
        b = collate(group, pad_id, cfg.device, with_next=(objective or cfg.objective) == "cdq")
        value, ph = batch_loss(scorer, b, objective or cfg.objective, inv_var_dev, loss or cfg.loss, ranges)
        total += float(value) * len(group)
        per_head += ph.cpu() * len(group)
        n += len(group)
    return total / max(n, 1), per_head / max(n, 1)


def r2_by_position(preds: dict, trues: dict, num_heads: int) -> dict[int | None, torch.Tensor]:
    """`position_values`' values and rewards -> R^2 per head at each position (NaN where no rollout
    reaches it)."""
    out = {}
    for p, pr in preds.items():
        t = trues[p]
        out[p] = (1 - ((pr - t) ** 2).mean(0) / t.var(0, unbiased=False).clamp(min=1e-8)) if len(t) \
            else torch.full((num_heads,), float("nan"))
    return out


@torch.no_grad()
def position_values(scorer: PrefixScorer, examples: list[Example], cfg: TrainConfig, pad_id: int,
                    positions: tuple[int | None, ...] = (None,)) -> tuple[dict, dict]:
    """Per position (None: the last token), the head values (n, H) of the rollouts that reach it and
    their final rewards (n, H), in the examples' order (`batches` groups them by length)."""
    index = {id(e): i for i, e in enumerate(examples)}
    preds, trues, rows = ({p: [] for p in positions} for _ in range(3))
    for group in batches(examples, cfg.batch_size, 0, shuffle=False):
        b = collate(group, pad_id, cfg.device, with_next=False)
        v = taken_values(scorer, scorer(b.input_ids, valid=b.valid).queries, b.input_ids)
        for p in positions:
            at = b.last if p is None else b.taken & (b.gen_pos == p - 1)  # one (or no) position per row
            preds[p].append(scorer.head_values(v[at], dim=-1).float().cpu())
            trues[p].append(b.rewards[at.any(1)].cpu())
            rows[p].append(torch.tensor([index[id(e)] for e in group], dtype=torch.long)[at.any(1).cpu()])
    order = {p: torch.cat(r).argsort() for p, r in rows.items()}
    return ({p: torch.cat(v)[order[p]] for p, v in preds.items()},
            {p: torch.cat(v)[order[p]] for p, v in trues.items()})


# -- the run --------------------------------------------------------------------------------------
def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def with_targets(examples: list[Example], target: str, eta: torch.Tensor | None) -> list[Example]:
    """The examples with their per-position targets (targets.prefix_targets) unless `final`."""
    if target == "final":
        return examples
    per = prefix_targets([e.prompt_id for e in examples], [e.input_ids[e.prompt_len:] for e in examples],
                         [e.rewards for e in examples], target, None if eta is None else eta.numpy(),
                         [e.base_from for e in examples])
    return [replace(e, targets=t.tolist()) for e, t in zip(examples, per)]


def train(rollouts_path: Path, labels_path: Path, out_dir: Path, cfg: TrainConfig,
          base_model_dir: Path | None = None, eval_rollouts: Path | None = None,
          eval_labels: Path | None = None, eval_prompt_ids: set[str] | None = None) -> Path:
    """Train a scorer; writes `out_dir/scorer` (float32 checkpoint), `loss.png`, `history.json`.
    With `eval_rollouts`/`eval_labels` (another run, e.g. of held-out prompts), every training
    prompt trains and those rollouts are the held-out set; with `eval_prompt_ids`, the rollouts of
    those prompts are; otherwise `eval_fraction` of the training prompts is held out."""
    from prefix_scorers.base_model import (
        default_cache_dir,
        load_model,
        load_tokenizer,
        resolve_model,
    )

    rank, world = _dist()
    if cfg.device.startswith("cuda") and world > 1:
        cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    heads = [HeadSpec(**h) for h in cfg.heads]
    base_dir = base_model_dir or resolve_model(cfg.base_model, default_cache_dir())
    tokenizer = load_tokenizer(base_dir)
    base = load_model(base_dir)
    ensemble = EnsembleSpec(size=cfg.ensemble, prior_scale=cfg.ensemble_prior) if cfg.ensemble > 1 else None
    scorer = init_from_base(base, tokenizer, heads, num_layers=cfg.num_layers, seed=cfg.seed,
                            base_name=Path(base_dir).name, ensemble=ensemble)
    del base
    init = init_from_checkpoint(scorer, cfg.init_from, tuple(cfg.retarget)) if cfg.init_from else None

    examples = load_examples(rollouts_path, labels_path, heads)
    if eval_rollouts is not None:
        train_ex, eval_ex = examples, load_examples(eval_rollouts, eval_labels, heads)
        overlap = {e.prompt_id for e in train_ex} & {e.prompt_id for e in eval_ex}
        if overlap:
            raise ValueError(f"{len(overlap)} prompts (e.g. {min(overlap)}) have rollouts in both "
                             f"{rollouts_path} and {eval_rollouts}: held-out prompts must not train")
    elif eval_prompt_ids is not None:
        train_ex = [e for e in examples if e.prompt_id not in eval_prompt_ids]
        eval_ex = [e for e in examples if e.prompt_id in eval_prompt_ids]
        if not eval_ex:
            raise ValueError(f"none of the {len(eval_prompt_ids)} held-out prompts has a rollout in {rollouts_path}")
    else:
        train_ex, eval_ex = split_by_prompt(examples, cfg.eval_fraction, cfg.seed)
    rewards = torch.tensor([e.rewards for e in train_ex])
    r_mean, r_std = rewards.mean(0), rewards.std(0, unbiased=False)
    dense = None
    if cfg.target == "dense":  # segment labels written by `label --segments`, beside labels.jsonl
        train_ex, dense = with_dense_targets(train_ex, heads, Path(labels_path).with_name("segment_labels.jsonl"),
                                             cfg.dense_source, cfg.dense_lambda, out_dir)
    else:
        train_ex = with_targets(train_ex, cfg.target, cfg.soft_eta * r_std.clamp(min=1e-6))
    train_ex = bootstrap(train_ex, cfg.ensemble, cfg.seed)
    # a (nearly) constant reward must not get a huge weight: floor its std at 10% of its range
    width = torch.tensor([h.reward_range[1] - h.reward_range[0] for h in heads])
    inv_var = 1.0 / torch.maximum(r_std, 0.1 * width) ** 2
    ranges = torch.tensor([list(h.reward_range) for h in heads], dtype=torch.float32)
    if init is None:
        with torch.no_grad():  # start at the mean reward, with small head projections
            scorer.head_bias.copy_(r_mean.repeat_interleave(cfg.ensemble))
            scorer.head_proj.mul_(0.1 * (cfg.ensemble_prior if cfg.ensemble > 1 else 1.0))
    scorer.train().requires_grad_(True)
    scorer.to(cfg.device)
    inv_var_dev = inv_var.to(cfg.device)
    model = scorer
    if world > 1:
        # broadcast_buffers off: the frozen embedding is a (large) buffer that never changes
        model = torch.nn.parallel.DistributedDataParallel(scorer, broadcast_buffers=False)
    head_params = [scorer.head_proj, scorer.head_bias]
    body = [p for n, p in scorer.named_parameters() if n not in ("head_proj", "head_bias")]
    opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay)
    # every process takes the same number of batches (DDP all-reduces once per step)
    steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size) // world if world > 1 else \
        math.ceil(len(train_ex) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    history = {"train": [], "eval": []}
    start_epoch, state_path = 0, out_dir / "train_state.pt"
    if state_path.is_file():  # resume
        state = torch.load(state_path, map_location=cfg.device, weights_only=False)
        saved = asdict(TrainConfig()) | state["config"]  # options added since: their defaults
        if saved == asdict(cfg) | {"device": saved["device"]}:
            scorer.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start_epoch, history = state["epoch"], state["history"]
        elif rank == 0:
            print(f"{state_path} was written with another configuration: starting over")
    pad = tokenizer.pad_token_id
    with_next, with_cands = cfg.objective == "cdq", cfg.state_weight > 0
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        groups = batches(train_ex, cfg.batch_size, cfg.seed + epoch, shuffle=True)
        groups = groups[: steps_per_epoch * world][rank::world]
        bar = tqdm(groups, desc=f"train {cfg.objective} epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0)
        for i, group in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = g.setdefault("base_lr", g["lr"]) * lr_factor(step, total, cfg.warmup_steps)
            loss, _ = batch_loss(model, collate(group, pad, cfg.device, with_next, with_cands), cfg.objective,
                                 inv_var_dev, cfg.loss, ranges, cfg.final_weight, cfg.state_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(scorer.parameters(), cfg.grad_clip)
            opt.step()
            history["train"].append((step, loss.item()))
            bar.set_postfix(loss=f"{history['train'][-1][1]:.3f}")
            if rank == 0 and eval_ex and (step % cfg.eval_every == 0 or i == len(groups) - 1):
                scorer.eval()
                history["eval"].append((step, evaluate(scorer, eval_ex, cfg, pad, inv_var, ranges=ranges)[0]))
                scorer.train()
        if rank == 0:
            torch.save({"config": asdict(cfg), "model": scorer.state_dict(), "optimizer": opt.state_dict(),
                        "epoch": epoch + 1, "history": history}, state_path)
    seconds = time.time() - t0
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return out_dir / "scorer"

    scorer.eval().requires_grad_(False)
    mean, std = value_statistics(scorer, train_ex, cfg.norm_positions, cfg.batch_size, pad, cfg.device,
                                 cfg.std_floor * r_std.to(cfg.device))
    scorer.norm_mean, scorer.norm_std = mean, std  # (H, P) buffers replace the (H, 1) identity
    metrics: dict[str, float] = {"train_seconds": round(seconds, 1), "epochs": cfg.epochs}
    if history["train"]:
        tail = [v for _, v in history["train"][-steps_per_epoch:]]
        metrics["train_loss_last_epoch"] = round(sum(tail) / len(tail), 4)
        metrics["train_loss_first_step"] = round(history["train"][0][1], 4)
    if eval_ex:
        # Both objectives are judged on the FUDGE loss too: the squared error to the true reward.
        ev, per_head = evaluate(scorer, eval_ex, cfg, pad, inv_var, objective="fudge", ranges=ranges, loss="mse")
        metrics["eval_fudge_loss"] = round(ev, 4)
        preds, trues = position_values(scorer, eval_ex, cfg, pad, (None, *R2_POSITIONS))
        early = r2_by_position(preds, trues, len(heads))
        r2 = early.pop(None)
        for i, (h, mse, r) in enumerate(zip(heads, per_head.tolist(), r2.tolist())):
            metrics[f"eval_mse_{h.name}"] = round(mse, 5)
            metrics[f"eval_r2_final_{h.name}"] = round(r, 4)
            for p, r_p in early.items():
                if math.isfinite(r_p[i].item()):
                    metrics[f"eval_r2_at{p}_{h.name}"] = round(r_p[i].item(), 4)
        ranking = held_out_ranking(eval_ex, preds[None], trues[None])  # ranking.py: >= 2 rollouts per prompt
        if ranking is not None:
            for i, h in enumerate(heads):
                metrics[f"eval_ranker_share_{h.name}"] = round(float(ranking["share_of_gain"][i]), 4)
        if all(e.topk_ids for e in eval_ex):  # the held-out token signal (token_signal.py)
            from prefix_scorers.token_signal import token_signal

            signal = token_signal(scorer, eval_ex, cfg.batch_size, pad, cfg.device)
            for i, h in enumerate(heads):
                metrics[f"eval_token_efficiency_{h.name}"] = round(float(signal["efficiency"][i]), 4)
                metrics[f"eval_token_signal_ratio_{h.name}"] = round(float(signal["signal_ratio"][i]), 4)
        metrics["eval_loss_initial"] = round(history["eval"][0][1], 4) if history["eval"] else float("nan")
        metrics["eval_loss_final"] = round(history["eval"][-1][1], 4) if history["eval"] else float("nan")
    scorer.config.provenance = Provenance(
        trained=True, base_model=Path(base_dir).name, objective=cfg.objective,
        data_size=len(train_ex) + len(eval_ex),
        seed=cfg.seed, metrics=metrics,
        note=(f"{cfg.num_layers} copied base layers + {len(heads)} CD-Q heads; {len(train_ex)} train / "
              f"{len(eval_ex)} eval rollouts; rewards {[h.reward for h in heads]}"),
        reward_mean=[round(x, 5) for x in r_mean.tolist()], reward_std=[round(x, 5) for x in r_std.tolist()],
        train_config={k: v for k, v in asdict(cfg).items() if k != "heads"},
        **({"dense_targets": dense} if dense else {}), **({"init_from": init} if init else {}))
    (out_dir / "history.json").write_text(json.dumps(history) + "\n")
    plot_losses(history, out_dir / "loss.png", f"{cfg.objective}: {len(train_ex)} train rollouts")
    save_scorer(scorer.cpu(), out_dir / "scorer")
    return out_dir / "scorer"


def plot_losses(history: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if history["train"]:
        steps, vals = zip(*history["train"])
        w = max(1, len(vals) // 50)
        smooth = [sum(vals[max(0, i - w + 1):i + 1]) / len(vals[max(0, i - w + 1):i + 1]) for i in range(len(vals))]
        ax.plot(steps, vals, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(steps, smooth, color="tab:blue", label="train (moving average)")
    if history["eval"]:
        steps, vals = zip(*history["eval"])
        ax.plot(steps, vals, "o-", color="tab:orange", label="eval (held-out prompts)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (sum over heads of MSE / var(reward))")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
