"""Scale-out check (issue 11): token and block mode with tensor / pipeline parallelism give the
single-worker outputs, on the vLLM backend.

Each configuration runs in its own process (one VLLMEngine at a time): the embedded SmolLM2
(float32, enforce_eager, 1 GiB KV cache), the default scorer, 4 chat prompts; token mode greedy
(strength 2, top_k 20, 32 tokens) and block mode near-greedy (K=3, M=4, temperature 1e-4, seed 0,
30 tokens: vLLM refuses n > 1 when greedy). A configuration that vLLM refuses is reported with its
error. Results: one JSON file (outputs per configuration, equal-to-tp1 per mode, errors).

    .venv/bin/python benchmarks/scale_out_check.py --configs tp1,tp2,pp2 \\
        --out benchmarks/results/scale_out_check_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"tp1": (1, 1), "tp2": (2, 1), "tp3": (3, 1), "pp2": (1, 2), "tp3pp2": (3, 2)}
QUESTIONS = ["Write a short review of a pizza place.", "What do you think about rainy days?",
             "Describe your last holiday in two sentences.", "Give me your opinion on modern art."]
MODES = {
    "token": ({"mode": "token", "strength": 2.0, "top_k": 20}, {"max_tokens": 32, "temperature": 0.0}),
    "block": ({"mode": "block", "num_candidates": 3, "block_size": 4},
              {"max_tokens": 30, "temperature": 1e-4, "seed": 0}),
}


async def _run_one(tp: int, pp: int, compiled: bool) -> dict:
    from cdserve.backends.vllm.engine import VLLMEngine
    from cdserve.config import EngineConfig, VLLMConfig
    from cdserve.control.request import resolve_control
    from cdserve.outputs import GenerationRequest
    from cdserve.sampling import SamplingParams

    cfg = EngineConfig(backend="vllm", device="cpu", dtype="float32", scorer="default", max_model_len=1024,
                       max_tokens_limit=512, max_batch_rows=16,
                       vllm=VLLMConfig(enforce_eager=not compiled, kv_cache_space_gib=1, tensor_parallel_size=tp,
                                       pipeline_parallel_size=pp, block_fork_hold_s=60, scorer_threads=1))
    engine = VLLMEngine(cfg)
    started = time.perf_counter()
    await engine.start()
    startup = time.perf_counter() - started
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for q in QUESTIONS]
    out: dict = {"startup_s": round(startup, 1), "modes": {}}
    try:
        for mode, (control, sampling) in MODES.items():
            rows = []
            for i, p in enumerate(prompts):
                req = GenerationRequest(f"{mode}{i}", p, SamplingParams(**sampling),
                                        resolve_control(control, engine.config.control, engine.head_names))
                ids, text, finish, ctl = [], "", None, None
                async for o in engine.generate(req):
                    for c in o.choices:
                        ids += c.token_ids
                        text += c.text
                        if c.finish_reason:
                            finish, ctl = c.finish_reason, c.control
                rows.append({"ids": ids, "text": text, "finish": finish,
                             "values": {k: round(v, 4) for k, v in (ctl.values or {}).items()} if ctl else None,
                             "kl": None if ctl is None or ctl.kl is None else round(ctl.kl, 4)})
            out["modes"][mode] = rows
    finally:
        await engine.shutdown()
    return out


def _bind_env(world: int) -> dict:
    """vLLM-CPU's automatic thread binding wants one NUMA node per worker ("Not enough allowed NUMA
    nodes to bind threads of 2 local CPUWorkers"); give each worker its own share of the allowed
    CPUs instead (VLLM_CPU_OMP_THREADS_BIND='0|1' on 2 cores), unless the caller set it."""
    if world == 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < world:
        return {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    per = len(cpus) // world
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, cpus[i * per:(i + 1) * per]))
                                                  for i in range(world))}


def run_config(name: str, timeout_s: float, log_dir: Path, compiled: bool) -> dict:
    """One configuration in a child process; its result, or the error it ended with (the child's
    whole stderr goes to log_dir/<name>.log)."""
    tp, pp = CONFIGS[name]
    started = time.perf_counter()
    env = os.environ | _bind_env(tp * pp)
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", name] + (["--compiled"] if compiled else []),
                              check=False, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as e:
        return {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "error": [f"timed out after {e.timeout} s"]}
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    result = {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "enforce_eager": not compiled,
              "VLLM_CPU_OMP_THREADS_BIND": env.get("VLLM_CPU_OMP_THREADS_BIND"),
              "wall_s": round(time.perf_counter() - started, 1)}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines and lines[-1].startswith("{"):
        return result | json.loads(lines[-1])
    errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln.lower()]
    return result | {"error": errors[-8:] or proc.stderr.splitlines()[-8:], "returncode": proc.returncode}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="tp1,tp2,pp2", help=f"comma-separated, from {sorted(CONFIGS)}")
    ap.add_argument("--out", default="benchmarks/results/scale_out_check_cpu.json")
    ap.add_argument("--timeout-s", type=float, default=900)
    ap.add_argument("--compiled", action="store_true", help="no enforce_eager (vLLM-CPU's pipeline "
                    "parallelism needs it: eager mode skips the warm-up that allocates a later stage's inputs)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        tp, pp = CONFIGS[args.one]
        print(json.dumps(asyncio.run(_run_one(tp, pp, args.compiled))))
        return 0
    names = args.configs.split(",")
    log_dir = Path(args.out).with_suffix("")
    results = {n: run_config(n, args.timeout_s, log_dir, args.compiled) for n in names}
    base = results.get("tp1", {}).get("modes")
    for name, r in results.items():
        if base and "modes" in r:
            r["equal_to_tp1"] = {m: [a["ids"] == b["ids"] and a["finish"] == b["finish"]
                                     for a, b in zip(r["modes"][m], base[m])] for m in MODES}
        print(name, {k: v for k, v in r.items() if k not in ("modes",)})
    from importlib import metadata

    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "vllm": next((metadata.version(d) for d in ("vllm-cpu", "vllm") if _has(d)), None),
           "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", args.out)
    return 0


def _has(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
