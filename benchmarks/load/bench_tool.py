"""One run of the standard load tool, `vllm bench serve`, against one server.

The tool does the load: prompt sampling, concurrency limit, streaming requests, timing, the
metrics (requests/s, output tokens/s, TTFT, TPOT, ITL, end-to-end latency with percentiles).
This file only writes its flags and reads back its result JSON. The control setting rides in
every request through the tool's `--extra-body` as the `control` extension.

Requests go to /v1/chat/completions with streaming on (the tool always streams). Prompts come
from the custom-dataset JSONL written by `dataset.py`; the tool's random dataset is not used
because it forces `ignore_eos`, a vLLM-only field that cdserve (an OpenAI-strict API) refuses.
So answers may end at EOS before `output_len`: the tool counts the tokens actually returned.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PERCENTILES = "50,90,99"
KEEP = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
        "request_throughput", "output_throughput", "total_token_throughput", "max_concurrency")
DETAIL = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "queue_times",
          "generated_texts", "errors")


@dataclass
class ToolRun:
    """What one tool run needs."""

    base_url: str
    model_id: str
    tokenizer: str
    dataset: Path
    num_prompts: int
    concurrency: int
    output_len: int
    temperature: float
    warmups: int
    extra_body: dict[str, Any] | None
    result_dir: Path
    name: str

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "benchmarks.load.vllm_bench_main",
                "--backend", "openai-chat", "--base-url", self.base_url,
                "--endpoint", "/v1/chat/completions", "--model", self.model_id,
                "--tokenizer", self.tokenizer,
                "--dataset-name", "custom", "--dataset-path", str(self.dataset), "--skip-chat-template",
                "--custom-output-len", str(self.output_len), "--num-prompts", str(self.num_prompts),
                "--max-concurrency", str(self.concurrency), "--request-rate", "inf",
                "--temperature", str(self.temperature), "--num-warmups", str(self.warmups),
                "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", PERCENTILES,
                "--save-result", "--save-detailed", "--result-dir", str(self.result_dir),
                "--result-filename", f"{self.name}.json", "--seed", "0"]
        if self.extra_body:
            argv += ["--extra-body", json.dumps(self.extra_body)]
        return argv


def run_tool(run: ToolRun, timeout_s: float, log_path: Path) -> dict[str, Any]:
    """Run the tool; return its metrics (plus `errors`: the distinct error messages, and
    `tool_returncode`). A run past `timeout_s` is killed and returned as failed."""
    run.result_dir.mkdir(parents=True, exist_ok=True)
    out_path = run.result_dir / f"{run.name}.json"
    out_path.unlink(missing_ok=True)
    argv = run.argv()
    with log_path.open("w") as log:
        log.write(" ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=Path(__file__).resolve().parents[2])
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = -9
    if not out_path.is_file():
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        return {"completed": 0, "failed": run.num_prompts, "tool_returncode": rc,
                "errors": [f"the tool wrote no result (exit {rc}: {tail[0][:200]}); log: {log_path}"]}
    raw = json.loads(out_path.read_text())
    return summarize(raw) | {"tool_returncode": rc}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """The tool's scalar metrics, and its distinct error messages (first line of each)."""
    out = {k: raw[k] for k in KEEP if k in raw}
    for key, value in raw.items():
        if key.startswith(("mean_", "median_", "std_", "p")) and key.endswith("_ms"):
            out[key] = value
    errors = {str(e).strip().splitlines()[-1][:300] for e in raw.get("errors", []) if e}
    out["errors"] = sorted(errors)
    lens = [n for n in raw.get("output_lens", []) if n]
    out["mean_output_len"] = sum(lens) / len(lens) if lens else 0.0
    return out
