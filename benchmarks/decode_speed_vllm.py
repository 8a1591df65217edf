"""Decode throughput of none vs token vs block on one engine, side by side, at fixed concurrency.

A seeded workload (chat prompts, fixed max_tokens, ignore nothing: answers may stop early), a
warm-up round, then one timed round per mode; one result line per mode. Drives the engine seam
(`Engine.generate`), so it measures the engine without HTTP; `measure()` works for any engine
(`hf` or `vllm`) and is what `benchmarks/decode_speed.py` can call.

    .venv/bin/python benchmarks/decode_speed_vllm.py --concurrency 16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

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
}


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                             add_generation_prompt=True, tokenize=False)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


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
    control = resolve_control(MODES[mode], engine.config.control, engine.head_names)
    reqs = [GenerationRequest(f"bench-{mode}-{seed}-{i}", p,
                              SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=seed + i), control)
            for i, p in enumerate(prompts)]
    sem = asyncio.Semaphore(concurrency)

    async def bounded(r):
        async with sem:
            return await _one(engine, r)

    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(r) for r in reqs))
    seconds = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    return {"backend": engine.backend_name, "mode": mode, "concurrency": concurrency, "requests": len(reqs),
            "max_tokens": max_tokens, "seconds": round(seconds, 2), "output_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            "base_tokens_generated": sum(g for _, g in results)}


async def measure(engine, modes=("none", "token", "block"), concurrency: int = 16, requests: int = 32,
                  max_tokens: int = 64) -> list[dict]:
    """Warm up once, then time each mode on the same prompts; one dict per mode (plus the ratio
    of each mode's throughput to `none`)."""
    prompts = chat_prompts(engine.tokenizer, requests)
    await run_mode(engine, "none", prompts[:concurrency], concurrency, 8, seed=999)  # warm-up
    rows = [await run_mode(engine, m, prompts, concurrency, max_tokens) for m in modes]
    base = next((r["tokens_per_s"] for r in rows if r["mode"] == "none"), None)
    for r in rows:
        r["vs_none"] = round(r["tokens_per_s"] / base, 3) if base else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--scorer", default="default")
    ap.add_argument("--kv-cache-space-gib", type=float, default=2)
    ap.add_argument("--no-eager", action="store_true", help="vllm: compile (slow start-up)")
    args = ap.parse_args()

    from cdserve.config import EngineConfig
    from cdserve.engine_factory import build_engine

    config = EngineConfig(backend=args.backend, scorer=args.scorer, enforce_eager=not args.no_eager,
                          kv_cache_space_gib=args.kv_cache_space_gib, max_model_len=1024, max_tokens_limit=512)

    async def go():
        engine = build_engine(config)
        t = time.perf_counter()
        await engine.start()
        print(json.dumps({"backend": engine.backend_name, "start_seconds": round(time.perf_counter() - t, 1)}),
              flush=True)
        try:
            for row in await measure(engine, concurrency=args.concurrency, requests=args.requests,
                                     max_tokens=args.max_tokens):
                print(json.dumps(row), flush=True)
        finally:
            await engine.shutdown()

    asyncio.run(go())


if __name__ == "__main__":
    main()
