"""`prefix-scorers`: one subcommand per stage of building a scorer, each resumable.

    prefix-scorers prompts                   # (re)write the committed prompt set
    prefix-scorers rollouts --samples 2      # sample from the base model   -> RUN/rollouts.jsonl
    prefix-scorers rollouts --roll-in-scorer DIR --roll-in-weights positive=1   # an on-policy round
    prefix-scorers branches --from-run-dir SRC --run-dir OUT   # continue candidate tokens at points of SRC's rollouts
    prefix-scorers label                     # score with every head's reward -> RUN/labels.jsonl
    prefix-scorers train --objective fudge   # train all heads              -> RUN/train/scorer
    prefix-scorers export --out DIR          # bfloat16 checkpoint, checked to load
    prefix-scorers evaluate --scorer DIR     # held-out R^2, ranker (ranking.py), token signal (token_signal.py) on RUN's rollouts
    prefix-scorers all ...                   # every stage in order (what built prefix_scorers/default)
    prefix-scorers rewards                   # list the registered rewards

RUN is `--run-dir` (default: <cdserve cache>/runs/default). Rerunning a stage continues where an
interrupted run stopped. `--reward-module mypkg.rewards` imports a module that registers rewards
of your own; `--head name=reward` picks heads (default: the four built-in ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "default"


def _run_dir(args) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    from prefix_scorers.base_model import default_cache_dir

    return default_cache_dir() / "runs" / "default"


def _heads(args) -> list[dict]:
    from prefix_scorers.checkpoint import DEFAULT_HEADS
    from prefix_scorers.config import HeadSpec
    from prefix_scorers.rewards import get_reward, import_reward_modules

    import_reward_modules(args.reward_module or [])
    if not args.head:
        return [h.model_dump() for h in DEFAULT_HEADS]
    heads = []
    for spec in args.head:
        name, _, reward = spec.partition("=")
        r = get_reward(reward or name)
        heads.append(HeadSpec(name=name, description=r.description, reward=r.name,
                              reward_range=r.reward_range).model_dump())
    return heads


def _base_dir(args) -> Path:
    from prefix_scorers.base_model import default_cache_dir, resolve_model

    return resolve_model(args.base_model, default_cache_dir())


def cmd_prompts(args) -> None:
    from prefix_scorers.prompts import write_prompt_set

    for path in write_prompt_set(Path(args.data_dir or Path(__file__).parent / "data"), seed=args.seed):
        print(path)


def cmd_rollouts(args) -> None:
    from prefix_scorers.rollouts import RolloutConfig, generate_rollouts

    roll_in = None
    if args.roll_in_scorer:  # an on-policy round: roll in with the steered policy (roll_in.py)
        from prefix_scorers.roll_in import RollIn, parse_weights

        roll_in = RollIn(args.roll_in_scorer, parse_weights(args.roll_in_weights), args.roll_in_strength,
                         args.roll_in_top_k)
    cfg = RolloutConfig(samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, batch_size=args.batch_size, seed=args.seed,
                        device=args.device, engine=args.engine, roll_in=roll_in)
    prompts = Path(args.prompts) if args.prompts else Path(__file__).parent / "data" / "prompts_train.jsonl"
    print(generate_rollouts(_base_dir(args), prompts, _run_dir(args) / "rollouts.jsonl", cfg, limit=args.limit))


def cmd_branches(args) -> None:
    from prefix_scorers.branches import BranchConfig, generate_branches
    from prefix_scorers.rollouts import RolloutConfig

    rc = RolloutConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       batch_size=args.batch_size, seed=args.seed, device=args.device, engine=args.engine)
    cfg = BranchConfig(points=args.points, candidates=args.candidates, rollout=rc)
    src = Path(args.from_run_dir) / "rollouts.jsonl"
    if not src.is_file():
        raise SystemExit(f"--from-run-dir {args.from_run_dir} has no rollouts.jsonl: make it with "
                         f"`prefix-scorers rollouts --run-dir {args.from_run_dir}`")
    print(generate_branches(_base_dir(args), src, _run_dir(args) / "rollouts.jsonl", cfg, limit=args.limit))


def cmd_label(args) -> None:
    from prefix_scorers.labels import label_rollouts

    heads = _heads(args)
    rewards = [h["reward"] for h in heads]
    run = _run_dir(args)
    print(label_rollouts(run / "rollouts.jsonl", run / "labels.jsonl", rewards))
    if getattr(args, "segments", None):
        _label_segments(args, run, heads, rewards)


def _label_segments(args, run: Path, heads: list[dict], rewards: list[str]) -> None:
    """`label --segments`: segment labels from every reward (and a critic) -> RUN/segment_labels.jsonl."""
    from prefix_scorers.base_model import load_tokenizer
    from prefix_scorers.critic import Critic, CriticConfig
    from prefix_scorers.segment_labels import SegmentConfig, segment_rollouts

    critic, critic_heads = None, {}
    if args.critic_url:
        critic = Critic(CriticConfig(base_url=args.critic_url, model=args.critic_model,
                                     api_key=os.environ.get("CRITIC_API_KEY", "EMPTY"), timeout=args.critic_timeout,
                                     retries=args.critic_retries, concurrency=args.critic_concurrency,
                                     extra_body=json.loads(args.critic_extra_body or "{}")))
        wanted = args.critic_heads.split(",") if args.critic_heads else [h["name"] for h in heads]
        unknown = set(wanted) - {h["name"] for h in heads}
        if unknown:
            raise SystemExit(f"--critic-heads {sorted(unknown)} are not heads of this run: {[h['name'] for h in heads]}")
        critic_heads = {h["name"]: h["description"] or h["name"] for h in heads if h["name"] in wanted}
    cfg = SegmentConfig(unit=args.segments, min_tokens=args.segment_min_tokens, max_tokens=args.segment_max_tokens)
    print(segment_rollouts(run / "rollouts.jsonl", run / "segment_labels.jsonl", load_tokenizer(_base_dir(args)),
                           rewards, cfg, critic, critic_heads))


def cmd_train(args) -> None:
    from prefix_scorers.prompts import read_jsonl
    from prefix_scorers.train import TrainConfig, train

    run = _run_dir(args)
    cfg = TrainConfig(objective=args.objective, epochs=args.epochs, batch_size=args.train_batch_size, lr=args.lr,
                      head_lr=args.head_lr, num_layers=args.num_layers, seed=args.seed, device=args.device,
                      base_model=args.base_model, heads=_heads(args), ensemble=args.ensemble,
                      ensemble_prior=args.ensemble_prior, target=args.target, soft_eta=args.soft_eta,
                      loss=args.loss, dense_source=args.dense_source, dense_lambda=args.dense_lambda,
                      eval_every=args.eval_every, init_from=args.init_from,
                      retarget=tuple(args.retarget_head),
                      final_weight=args.final_weight, state_weight=args.state_weight)
    held = Path(args.eval_run_dir) if getattr(args, "eval_run_dir", None) else None
    held_ids = {p["id"] for p in read_jsonl(Path(args.eval_prompts))} if getattr(args, "eval_prompts", None) else None
    out = train(run / "rollouts.jsonl", run / "labels.jsonl", Path(args.train_dir) if args.train_dir else
                run / "train", cfg, _base_dir(args), eval_rollouts=held and held / "rollouts.jsonl",
                eval_labels=held and held / "labels.jsonl", eval_prompt_ids=held_ids)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 writes and reports
    print(out)
    print(json.dumps(json.loads((out / "config.json").read_text())["provenance"]["metrics"], indent=2))


def cmd_export(args) -> None:
    from prefix_scorers.export import check_loads, export_scorer

    src = Path(args.src) if args.src else _run_dir(args) / "train" / "scorer"
    out = export_scorer(src, Path(args.out), dtype=args.dtype, max_mb=args.max_mb, std_floor=args.std_floor)
    print(check_loads(out, _base_dir(args)))


def cmd_evaluate(args) -> None:
    from prefix_scorers.base_model import load_model, load_tokenizer
    from prefix_scorers.checkpoint import load_scorer
    from prefix_scorers.prompts import read_jsonl
    from prefix_scorers.ranking import held_out_ranking
    from prefix_scorers.token_signal import token_signal
    from prefix_scorers.train import (
        R2_POSITIONS,
        TrainConfig,
        load_examples,
        position_values,
        r2_by_position,
    )

    base_dir = _base_dir(args)
    tokenizer = load_tokenizer(base_dir)
    emb = load_model(base_dir).get_input_embeddings().weight.detach().float()
    scorer = load_scorer(Path(args.scorer), tokenizer, emb).eval()
    run = _run_dir(args)
    examples = load_examples(run / "rollouts.jsonl", run / "labels.jsonl", scorer.config.heads)
    if args.prompts:
        ids = {p["id"] for p in read_jsonl(Path(args.prompts))}
        examples = [e for e in examples if e.prompt_id in ids]
    cfg = TrainConfig(batch_size=args.train_batch_size, device=args.device)
    pad = tokenizer.pad_token_id
    preds, trues = position_values(scorer, examples, cfg, pad, (None, *R2_POSITIONS))
    r2 = r2_by_position(preds, trues, scorer.num_heads)
    rows = {("final" if p is None else f"at{p}"): v for p, v in r2.items()}
    per_head = lambda v, n=4: dict(zip(scorer.config.head_names, [round(x, n) for x in v.tolist()]))
    signal = token_signal(scorer, examples, cfg.batch_size, pad, cfg.device)
    ranking = held_out_ranking(examples, preds[None], trues[None])
    ranker = {} if ranking is None else {"ranker": {
        "prompts": int(ranking["prompts"]), "share_of_gain": per_head(ranking["share_of_gain"]),
        "scorer_picks": per_head(ranking["picked"]), "true_picks": per_head(ranking["best"]),
        "all_rollouts": per_head(ranking["mean"])}}
    print(json.dumps({"scorer": args.scorer, "rollouts": len(examples), "prompts": len({e.prompt_id for e in examples}),
                      "r2": {k: per_head(v) for k, v in rows.items()}, **ranker,
                      "token_signal": {k: per_head(v, 5) for k, v in signal.items()}}, indent=2))


def cmd_all(args) -> None:
    for stage in (cmd_rollouts, cmd_label, cmd_train, cmd_export):
        stage(args)


def cmd_rewards(args) -> None:
    from prefix_scorers.rewards import import_reward_modules, list_rewards

    import_reward_modules(args.reward_module or [])
    for r in list_rewards():
        print(f"{r.name:16s} [{r.reward_range[0]:g}, {r.reward_range[1]:g}]  {r.description}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prefix-scorers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, run=True):
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=int, help="CPU threads for torch (on a shared or busy machine, 1 "
                        "is often several times faster than oversubscribed cores)")
        sp.add_argument("--reward-module", action="append", help="module that registers rewards (repeatable)")
        sp.add_argument("--head", action="append", help="head as name=reward (repeatable; default: the four built-ins)")
        if run:
            sp.add_argument("--run-dir", help="where this run's files go (default: <cache>/runs/default)")
            sp.add_argument("--base-model", default="smollm2", help="'smollm2' or a local HF model folder")
            sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")

    def rollout_args(sp):
        sp.add_argument("--prompts", help="prompt JSONL (default: the committed train split)")
        sp.add_argument("--samples", type=int, default=2, help="rollouts per prompt")
        sp.add_argument("--max-new-tokens", type=int, default=48)
        sp.add_argument("--temperature", type=float, default=0.7)
        sp.add_argument("--batch-size", type=int, default=32)
        sp.add_argument("--limit", type=int, help="use only the first N prompts")
        sp.add_argument("--engine", choices=["hf", "vllm"], default="hf")
        sp.add_argument("--roll-in-scorer", help="on-policy round: roll in with token-mode steering by this "
                        "scorer up to a random switch point per rollout, then the base model (values stay the "
                        "base policy's: training masks the roll-in positions)")
        sp.add_argument("--roll-in-weights", nargs="+", metavar="HEAD=W", help="roll-in head weights "
                        "(default: positive=1)")
        sp.add_argument("--roll-in-strength", type=float, default=2.0, help="roll-in steering strength")
        sp.add_argument("--roll-in-top-k", type=int, default=20, help="roll-in steers the base model's top k "
                        "tokens (0: the whole vocabulary)")

    def train_args(sp, batch=True):
        sp.add_argument("--objective", choices=["fudge", "cdq"], default="fudge")
        sp.add_argument("--target", choices=["final", "mean", "soft", "dense"], default="final", help="fudge: what "
                        "each prefix regresses onto (prefix_scorers/targets.py): its rollout's reward, the mean or "
                        "the soft value over the prompt's rollouts sharing that prefix; dense: the reward mixed "
                        "with a reward-to-go from segment labels (dense_targets.py; needs label --segments)")
        sp.add_argument("--dense-source", choices=["reward", "critic"], default="reward", help="dense target: "
                        "segment labels from each head's reward on prefixes, or from the critic")
        sp.add_argument("--dense-lambda", type=float, default=0.5, help="dense target: weight in [0, 1] of the "
                        "segment-label reward-to-go against the final reward (0: final reward only)")
        sp.add_argument("--soft-eta", type=float, default=1.0, help="soft target temperature, in units of each "
                        "head's reward std")
        sp.add_argument("--final-weight", type=float, default=0.0, help="share in [0, 1) of the loss on the "
                        "finished answer's value (what best-of-N and block selection rank by); the rest is the mean "
                        "over every prefix")
        sp.add_argument("--state-weight", type=float, default=0.0, help="weight of the state-value term: "
                        "sum_z p(z) Q(s, z) over the stored top-k candidates regressed onto the same target as "
                        "Q(s, y), which trains the values token mode compares (0: off)")
        sp.add_argument("--loss", choices=["mse", "bce"], default="mse", help="bce: cross-entropy on the "
                        "value and target rescaled to [0, 1] by the reward range")
        sp.add_argument("--eval-run-dir", help="held-out run (rollouts.jsonl + labels.jsonl of other prompts): "
                        "evaluate there and train on every prompt of RUN")
        sp.add_argument("--eval-prompts", help="prompt JSONL whose rollouts in RUN are held out (e.g. "
                        "prefix_scorers/data/prompts_eval.jsonl); the other prompts train")
        sp.add_argument("--train-dir", help="where training writes (default: RUN/train)")
        sp.add_argument("--eval-every", type=int, default=25, help="steps between held-out loss points (and "
                        "after each epoch); each is a pass over the held-out rollouts")
        sp.add_argument("--epochs", type=int, default=3)
        names = ("--batch-size", "--train-batch-size") if batch else ("--train-batch-size",)
        sp.add_argument(*names, dest="train_batch_size", type=int, default=16)
        sp.add_argument("--lr", type=float, default=1e-4)
        sp.add_argument("--head-lr", type=float, default=1e-3)
        sp.add_argument("--num-layers", type=int, default=2, help="base layers copied into the scorer")
        sp.add_argument("--init-from", help="continue training a trained scorer checkpoint (e.g. RUN/train/scorer): "
                        "its weights replace the copied layers and fresh heads; architecture and heads must "
                        "match (same --num-layers, --head); the optimiser and its warmup start afresh")
        sp.add_argument("--retarget-head", action="append", default=[], metavar="NAME",
                        help="with --init-from: head NAME continues on this run's reward for it although the "
                        "checkpoint trained it on another of the same range (a corrected reward); repeatable")
        sp.add_argument("--ensemble", type=int, default=1, help="value projections per head, each trained on "
                        "its own bootstrap resample of the rollouts; >1 makes the scorer report a spread")
        sp.add_argument("--ensemble-prior", type=float, default=1.0, help="scale of the members' random "
                        "initial projections (x the single-projection init)")

    def segment_args(sp):
        sp.add_argument("--segments", choices=["sentence", "clause"], help="also label every segment of every "
                        "rollout (prefix_scorers/segment_labels.py) -> RUN/segment_labels.jsonl")
        sp.add_argument("--segment-min-tokens", type=int, default=2, help="shorter segments join the next one")
        sp.add_argument("--segment-max-tokens", type=int, default=24, help="longer segments split at a word")
        sp.add_argument("--critic-url", help="OpenAI-compatible base URL of a critic model that rates each "
                        "segment (e.g. http://127.0.0.1:8000/v1; key from CRITIC_API_KEY)")
        sp.add_argument("--critic-model", help="critic model name (default: the server's first model)")
        sp.add_argument("--critic-heads", help="comma-separated heads the critic rates (default: every head)")
        sp.add_argument("--critic-timeout", type=float, default=60.0, help="seconds per critic request")
        sp.add_argument("--critic-retries", type=int, default=2, help="retries per critic request")
        sp.add_argument("--critic-concurrency", type=int, default=4, help="critic requests in flight")
        sp.add_argument("--critic-extra-body", help='JSON added to each critic request, e.g. '
                        '\'{"control": {"mode": "none"}}\' for cdserve')

    def export_args(sp):
        sp.add_argument("--src", help="trained checkpoint (default: RUN/train/scorer)")
        sp.add_argument("--out", default=str(DEFAULT_OUT))
        sp.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
        sp.add_argument("--max-mb", type=float, default=25.0)
        sp.add_argument("--std-floor", type=float, help="raise the normaliser's std to at least this share of each "
                        "head's reward std (export.py); default: as trained")

    sp = sub.add_parser("prompts", help="write the prompt set (train/eval JSONL)")
    common(sp, run=False)
    sp.add_argument("--data-dir")
    sp.set_defaults(fn=cmd_prompts)
    sp = sub.add_parser("rollouts", help="sample continuations from the base model")
    common(sp)
    rollout_args(sp)
    sp.set_defaults(fn=cmd_rollouts)
    sp = sub.add_parser("branches", help="continue the most likely candidates at points of a run's rollouts "
                        "(branches.py): the values token mode compares, measured")
    common(sp)
    sp.add_argument("--from-run-dir", required=True, help="the run whose rollouts are branched (its stored top-k)")
    sp.add_argument("--points", type=int, default=2, help="branch points per source rollout")
    sp.add_argument("--candidates", type=int, default=4, help="most likely tokens continued at each point")
    sp.add_argument("--max-new-tokens", type=int, default=48, help="the source run's answer length")
    sp.add_argument("--temperature", type=float, default=0.7, help="the source run's temperature")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--limit", type=int, help="branch only the first N source rollouts")
    sp.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    sp.set_defaults(fn=cmd_branches)
    sp = sub.add_parser("label", help="score every rollout with every head's reward")
    common(sp)
    segment_args(sp)
    sp.set_defaults(fn=cmd_label)
    sp = sub.add_parser("train", help="train all heads (CD-FUDGE or CD-Q)")
    common(sp)
    train_args(sp)
    sp.set_defaults(fn=cmd_train)
    sp = sub.add_parser("export", help="write a shippable checkpoint")
    common(sp)
    export_args(sp)
    sp.set_defaults(fn=cmd_export)
    sp = sub.add_parser("evaluate", help="held-out R^2 of a scorer's values, its ranking of finished answers (ranking.py) and its token signal (token_signal.py) against RUN's labels")
    common(sp)
    sp.add_argument("--scorer", required=True, help="scorer checkpoint directory")
    sp.add_argument("--prompts", help="only the rollouts of these prompts (JSONL), e.g. the eval split")
    sp.add_argument("--batch-size", dest="train_batch_size", type=int, default=16)
    sp.set_defaults(fn=cmd_evaluate)
    sp = sub.add_parser("all", help="rollouts, label, train, export")
    common(sp)
    rollout_args(sp)
    train_args(sp, batch=False)
    export_args(sp)
    sp.set_defaults(fn=cmd_all)
    sp = sub.add_parser("rewards", help="list the registered rewards")
    common(sp, run=False)
    sp.set_defaults(fn=cmd_rewards)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
