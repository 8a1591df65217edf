"""Issue 11, problem 7: plain vLLM AsyncLLM (no cdserve), N distinct long prompts at once, then the
first --alone of them one at a time; prints the answers that differ and the mean lengths.

    VLLM_CPU_KVCACHE_SPACE=4 .venv/bin/python benchmarks/plain_vllm_load_check.py --no-chunked --tag greedy
    VLLM_CPU_KVCACHE_SPACE=4 .venv/bin/python benchmarks/plain_vllm_load_check.py --no-chunked \\
        --temperature 0.7 --warm 1,4,16 --alone 0 --tag t07

--no-chunked with the default --block-size 32 are cdserve's CPU options. Answers go to
/tmp/plain_vllm_load_check_<tag>.json."""
import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

def make_prompts(tok, n, plen, salt="r"):
    sys.path.insert(0, str(REPO))
    from benchmarks.load.dataset import write_prompts
    out = Path(f"/tmp/plain_vllm_load_check_prompts_{n}_{plen}_{salt}.jsonl")
    write_prompts(REPO / "prefix_scorers/data/prompts_eval.jsonl", out, n, tok, prompt_len=plen, salt=salt)
    rows = [json.loads(l)["prompt"] for l in out.read_text().splitlines()]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": r}], add_generation_prompt=True, tokenize=False), add_special_tokens=False) for r in rows]

async def main(a):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM
    model = os.path.expanduser("~/.cache/cdserve/models/SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(model)
    prompts = make_prompts(tok, a.n, a.plen)
    def sp_for(i):
        seed = (1234 + i) if a.seeded else None
        return SamplingParams(temperature=a.temperature, max_tokens=a.max_tokens, seed=seed)
    async def one(i, p):
        out = None
        async for o in llm.generate(TokensPrompt(prompt_token_ids=p), sp_for(i % 1000), request_id=f"{a.tag}{i}-{time.time()}"):
            out = o
        return list(out.outputs[0].token_ids), out.outputs[0].finish_reason
    print("prompt lens", min(map(len, prompts)), max(map(len, prompts)), flush=True)
    kw = {"model": model, "dtype": "float32", "max_model_len": a.max_model_len, "enable_prefix_caching": not a.no_prefix_cache,
              "enforce_eager": True, "max_num_seqs": a.max_num_seqs, "seed": 0, "disable_log_stats": False}
    if a.block_size: kw["block_size"] = a.block_size
    if a.no_chunked: kw.update(enable_chunked_prefill=False, max_num_batched_tokens=max(a.max_model_len, 2048))
    if a.mnbt: kw["max_num_batched_tokens"] = a.mnbt
    print(kw, "KV", os.environ.get("VLLM_CPU_KVCACHE_SPACE"), flush=True)
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
    async def logger():
        while True:
            await asyncio.sleep(5)
            await llm.do_log_stats()
    _stats_task = asyncio.create_task(logger())  # held: the loop keeps only a weak reference
    for w, wn in enumerate(a.warm):
        wp = make_prompts(tok, wn, a.plen, salt=f"w{w}_")
        t = time.time()
        res = await asyncio.gather(*[one(9000 + 100 * w + i, p) for i, p in enumerate(wp)])
        print(f"warm {wn}: {time.time()-t:.1f}s mean len {sum(len(x[0]) for x in res)/len(res):.1f}", flush=True)
    t = time.time()
    together = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    print(f"together: {time.time()-t:.1f}s mean len {sum(len(x[0]) for x in together)/len(together):.1f}", flush=True)
    t = time.time()
    alone = []
    for i, p in enumerate(prompts[:a.alone]):
        alone.append(await one(1000 + i, p))
    print(f"alone: {time.time()-t:.1f}s mean len {sum(len(x[0]) for x in alone)/max(1,len(alone)):.1f}", flush=True)
    diff = 0
    for i, (x, y) in enumerate(zip(together, alone)):
        if x[0] != y[0]:
            diff += 1
            k = next((j for j in range(min(len(x[0]), len(y[0]))) if x[0][j] != y[0][j]), min(len(x[0]), len(y[0])))
            print(f"  #{i}: together {len(x[0])} {x[1]} vs alone {len(y[0])} {y[1]}; first diff at {k}: {tok.decode(x[0][:k+3])!r} | {tok.decode(y[0][:k+3])!r}")
    print(f"RESULT differ {diff}/{len(alone)}; together lens {[len(x[0]) for x in together]}", flush=True)
    Path(f"/tmp/plain_vllm_load_check_{a.tag}.json").write_text(json.dumps({"together": together, "alone": alone}))
    llm.shutdown()

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64); ap.add_argument("--plen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64); ap.add_argument("--alone", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048); ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32); ap.add_argument("--no-chunked", action="store_true")
    ap.add_argument("--no-prefix-cache", action="store_true"); ap.add_argument("--mnbt", type=int, default=0)
    ap.add_argument("--tag", default="x")
    ap.add_argument("--temperature", type=float, default=0.0); ap.add_argument("--seeded", action="store_true")
    ap.add_argument("--warm", type=lambda x: [int(v) for v in x.split(",") if v], default=[])
    asyncio.run(main(ap.parse_args()))
