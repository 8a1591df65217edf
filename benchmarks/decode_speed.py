"""Decode throughput of each control mode on the embedded default, side by side in one run.

A seeded workload (chat prompts, temperature 0.7, fixed max_tokens; answers may stop early), one
warm-up round, then one timed round per (concurrency, mode) on the same prompts. Throughput is
accepted output tokens per second; `base_tokens_generated` also counts the candidates that
block and best_of_n sampled and discarded. Drives the engine seam (`Engine.generate`): this is
the engine without HTTP (benchmarks/load/ measures the server).

The pseudo-mode `generate` (hf only) is the baseline a continuous-batching engine is held to:
transformers' `model.generate` on static batches of `concurrency` prompts (left-padded), the
engine's own model object, same prompts, temperature, max_tokens and stop at EOS, in the same
process and the same rotation of rounds as the modes.

    .venv/bin/python benchmarks/decode_speed.py                       # hf at 1 and 8 concurrent
    .venv/bin/python benchmarks/decode_speed.py --backend vllm --concurrency 16 --modes none,token,block
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import time
from pathlib import Path

import psutil
import torch

from cdserve.control.request import resolve_control
from cdserve.outputs import GenerationRequest
from cdserve.sampling import SamplingParams

QUESTIONS = ["Write a short review of a pizza place.", "What do you think about rainy days?",
             "Describe your last holiday in two sentences.", "Give me your opinion on modern art.",
             "How was the concert last night?", "Tell me about your favourite book.",
             "What is your view on remote work?", "Review the new phone you bought."]

MODES = {
    "none": {"mode": "none"},
    "token": {"mode": "token", "strength": 2.0, "top_k": 20},
    "block": {"mode": "block", "block_size": 8, "num_candidates": 4},
    "best_of_n": {"mode": "best_of_n", "num_candidates": 4},
}


def mode_control(mode: str) -> dict:
    """A mode's control; `token@K` is token mode at top_k K (0: the whole vocabulary), `token@K:keep`
    the same with the tokens outside the top K kept (control.tail), `token@K:TAIL:P` with
    control.plausibility P as well."""
    name, _, setting = mode.partition("@")
    top_k, _, rest = setting.partition(":")
    tail, _, plausibility = rest.partition(":")
    return {**MODES[name], **({"top_k": int(top_k)} if top_k else {}), **({"tail": tail} if tail else {}),
            **({"plausibility": float(plausibility)} if plausibility else {})}


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                             add_generation_prompt=True, tokenize=False)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def cpu_seconds() -> float:
    """CPU time of this process and its children (vLLM's engine and workers run in children).
    On a shared machine, CPU seconds per token barely move with other load; wall time does."""
    procs = [psutil.Process()]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def _one(engine, req: GenerationRequest) -> tuple[int, int]:
    tokens = generated = 0
    async for out in engine.generate(req):
        for c in out.choices:
            tokens += len(c.token_ids)
            if c.control is not None:
                generated += c.control.tokens_generated
    return tokens, generated


async def run_mode(engine, mode: str, prompts: list[list[int]], concurrency: int, max_tokens: int,
                   seed: int = 0) -> dict:
    control = resolve_control(mode_control(mode), engine.config.control, engine.head_names)
    reqs = [GenerationRequest(f"bench-{mode}-{concurrency}-{seed}-{i}", p,
                              SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=seed + i), control)
            for i, p in enumerate(prompts)]
    sem = asyncio.Semaphore(concurrency)

    async def bounded(r):
        async with sem:
            return await _one(engine, r)

    start, cpu_start = time.perf_counter(), cpu_seconds()
    results = await asyncio.gather(*(bounded(r) for r in reqs))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    tokens = sum(t for t, _ in results)
    return {"backend": engine.backend_name, "mode": mode, "concurrency": concurrency, "requests": len(reqs),
            "max_tokens": max_tokens, "seconds": round(seconds, 2), "output_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "cpu_ms_per_token": round(1000 * cpu / max(tokens, 1), 1),
            "base_tokens_generated": sum(g for _, g in results)}


def run_generate(engine, prompts: list[list[int]], concurrency: int, max_tokens: int, seed: int = 0) -> dict:
    """Static-batch baseline: `model.generate` on batches of `concurrency` left-padded prompts (the
    hf engine's model, sampling as in run_mode). Output tokens: each row's tokens before its EOS."""
    if engine.backend_name != "hf":
        raise SystemExit("mode 'generate' (the static-batch baseline) needs --backend hf")
    model, eos = engine.core.runner.model, sorted(engine.core.eos)
    engine_attention = model.config._attn_implementation
    model.set_attn_implementation("sdpa")  # the baseline as transformers ships it, not the engine's attention
    try:
        return _generate(engine, model, eos, prompts, concurrency, max_tokens, seed)
    finally:
        model.set_attn_implementation(engine_attention)


def _generate(engine, model, eos: list[int], prompts: list[list[int]], concurrency: int, max_tokens: int,
              seed: int) -> dict:
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else eos[0]
    start, cpu_start = time.perf_counter(), cpu_seconds()
    tokens = 0
    for b in range(0, len(prompts), concurrency):
        batch = prompts[b:b + concurrency]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=engine.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=engine.device)
        torch.manual_seed(seed + b)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=0,
                                 top_p=1.0, max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=pad)
        for row in out[:, width:].tolist():
            ends = [i for i, t in enumerate(row) if t in eos]
            tokens += ends[0] if ends else len(row)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    return {"backend": "hf", "mode": "generate", "concurrency": concurrency, "requests": len(prompts),
            "max_tokens": max_tokens, "seconds": round(seconds, 2), "output_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "cpu_ms_per_token": round(1000 * cpu / max(tokens, 1), 1),
            "base_tokens_generated": tokens}


async def measure(engine, modes=("none", "token", "block"), concurrency: int = 16, requests: int = 32,
                  max_tokens: int = 64, repeats: int = 1) -> list[dict]:
    """Warm up once, then time each mode on the same prompts, `repeats` rounds with the mode order
    rotated each round (so a change in machine load hits every mode alike); one row per mode with
    the median round, and each mode's ratio of medians to `none`."""
    prompts = chat_prompts(engine.tokenizer, requests)
    await run_mode(engine, "none", prompts[:concurrency], concurrency, 8, seed=999)  # warm-up
    if "generate" in modes:
        run_generate(engine, prompts[:concurrency], concurrency, 8, seed=999)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(repeats):
        for m in modes[r % len(modes):] + modes[: r % len(modes)]:
            runs[m].append(run_generate(engine, prompts, concurrency, max_tokens) if m == "generate"
                           else await run_mode(engine, m, prompts, concurrency, max_tokens))
    rows = []
    for m in modes:
        ordered = sorted(runs[m], key=lambda x: x["tokens_per_s"])
        row = dict(ordered[len(ordered) // 2])
        row["tokens_per_s_runs"] = [x["tokens_per_s"] for x in runs[m]]
        rows.append(row)
    base = next((r for r in rows if r["mode"] == "none"), None)
    static = next((r for r in rows if r["mode"] == "generate"), None)
    for r in rows:
        r["vs_generate"] = round(r["tokens_per_s"] / static["tokens_per_s"], 3) if static else None
        r["cpu_ms_per_token_runs"] = [x["cpu_ms_per_token"] for x in runs[r["mode"]]]
        r["cpu_ms_per_token"] = sorted(r["cpu_ms_per_token_runs"])[len(runs[r["mode"]]) // 2]
        r["vs_none"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3) if base else None
        # throughput per CPU-second relative to none: robust to other load on a shared machine
        r["cpu_vs_none"] = round(base["cpu_ms_per_token"] / r["cpu_ms_per_token"], 3) if base else None
    return rows


def table(rows: list[dict]) -> str:
    lines = [("| backend | concurrency | mode | output tok/s (median) | rounds | vs none (wall) | vs generate (wall) | "
              "CPU ms / token | vs none (CPU) | base tokens / output token |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cost = r["base_tokens_generated"] / max(r["output_tokens"], 1)
        rounds = ", ".join(str(x) for x in r.get("tokens_per_s_runs", [r["tokens_per_s"]]))
        lines.append(f"| {r['backend']} | {r['concurrency']} | {r['mode']} | {r['tokens_per_s']} | {rounds} | "
                     f"{r['vs_none']} | {r.get('vs_generate')} | {r['cpu_ms_per_token']} | {r['cpu_vs_none']} | {cost:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--concurrency", default="1,8", help="comma-separated levels")
    ap.add_argument("--modes", default=None, help="comma-separated; token@K: token mode at top_k K (token@K:keep: its tail kept; token@K:drop:P: control.plausibility P); 'generate' is the static-batch "
                    "transformers baseline (hf only); default: generate,none,token,block,best_of_n on hf")
    ap.add_argument("--requests-per-level", type=int, default=2, help="requests = this x concurrency (min 4)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="rounds per mode (median reported)")
    ap.add_argument("--scorer", default="default")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--kv-cache-space-gib", type=float, default=2)
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/decode_speed_<backend>.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cdserve.config import EngineConfig, VLLMConfig
    from cdserve.engine_factory import build_engine

    config = EngineConfig(backend=args.backend, scorer=args.scorer, max_batch_rows=64, max_model_len=1024,
                          max_tokens_limit=512,
                          vllm=VLLMConfig(enforce_eager=True, kv_cache_space_gib=args.kv_cache_space_gib))
    modes = tuple((args.modes or ("generate,none,token,block,best_of_n" if args.backend == "hf"
                                  else "none,token,block,best_of_n")).split(","))

    async def go() -> list[dict]:
        engine = build_engine(config)
        t = time.perf_counter()
        await engine.start()
        print(json.dumps({"backend": engine.backend_name, "start_seconds": round(time.perf_counter() - t, 1)}),
              flush=True)
        rows = []
        try:
            for c in (int(x) for x in args.concurrency.split(",")):
                for row in await measure(engine, modes, concurrency=c, requests=max(4, args.requests_per_level * c),
                                         max_tokens=args.max_tokens, repeats=args.repeats):
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            await engine.shutdown()
        return rows

    rows = asyncio.run(go())
    out = Path(args.out or Path(__file__).parent / "results" / f"decode_speed_{args.backend}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/decode_speed.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
            "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} "
            f"torch threads, {platform.platform()}", "torch": torch.__version__}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
