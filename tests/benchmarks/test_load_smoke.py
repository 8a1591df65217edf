"""The load command end to end, small: cdserve (hf backend, the tiny model and scorer) driven by
`vllm bench serve` for two control modes, then the JSON, the plots and the report. Also the
pure parts (config checks, comparisons) and the ARGS baseline's decoder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.load.config import ConfigError, load_config
from benchmarks.load.report import compare
from benchmarks.load.runner import median_over_rounds

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("vllm.benchmarks.serve", reason="the load tool is vllm's `bench serve`")
pytest.importorskip("pandas", reason="vllm bench's custom dataset reads JSONL with pandas")


def smoke_config(model: Path, scorer: Path) -> str:
    return f"""
[bench]
tokenizer = "{model}"
num_prompts = 3
concurrency = [2]
output_len = [4]
warmups = 0
rounds = 2
run_timeout_s = 150
ready_timeout_s = 150

[[servers]]
name = "cdserve-hf"
kind = "cdserve"
backend = "hf"
model = "{model}"
scorer = "{scorer}"
args = ["--max-model-len", "512", "--max-tokens-limit", "256"]

[[runs]]
label = "none"
server = "cdserve-hf"
control = {{ mode = "none" }}

[[runs]]
label = "token"
server = "cdserve-hf"
control = {{ mode = "token", strength = 2.0, top_k = 5 }}

[[comparisons]]
name = "token vs none"
candidate = "token"
baseline = "none"
metric = "output_throughput"
concurrency = 2
target = ">= 0.01"
"""


@pytest.mark.timeout(300)
def test_load_command_writes_json_plots_and_report(tmp_path, tiny_model_dir, tiny_scorer_dir):
    cfg = tmp_path / "smoke.toml"
    cfg.write_text(smoke_config(tiny_model_dir, tiny_scorer_dir))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.load", "run", "--config", str(cfg),
                           "--out", str(out)], check=False, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    runs = {r["label"]: r for r in results["runs"]}
    assert set(runs) == {"none", "token"}
    # two interleaved rounds: none, token, none, token; each point the median of its two
    assert [(r["label"], r["round"]) for r in results["runs_by_round"]] == [
        ("none", 0), ("token", 0), ("none", 1), ("token", 1)]
    for r in runs.values():
        assert (r["completed"], r["failed"]) == (6, 0) and not r.get("errors")
        assert [x["completed"] for x in r["rounds"]] == [3, 3]
        assert r["output_throughput"] > 0 and r["request_throughput"] > 0
        for key in ("p50_ttft_ms", "p99_ttft_ms", "p90_tpot_ms", "p50_itl_ms", "p99_e2el_ms"):
            assert key in r, key
        assert r["rss_after_mib"] > 0
        assert '"control"' in r["tool_command"]  # the control extension rode in every request
    assert runs["token"]["control"] == {"mode": "token", "strength": 2.0, "top_k": 5}
    assert results["meta"]["versions"] and results["servers"]["cdserve-hf"]["model_id"]

    plots = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in plots} == {"throughput_p0_o4.png", "latency_p0_o4.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    report = (out / "report.md").read_text()
    assert "| token vs none | output_throughput | 2 |" in report and "| yes |" in report
    assert len(compare(results)[0]["round_ratios"]) == 2


def test_config_refuses_unknown_names(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[servers]]\nname = "a"\nkind = "cdserve"\n[[runs]]\nlabel = "x"\nserver = "b"\n')
    with pytest.raises(ConfigError, match="server='b' names no server"):
        load_config(cfg)
    cfg.write_text('[bench]\nnum_prompts = 0\n')
    with pytest.raises(ConfigError, match="num_prompts=0"):
        load_config(cfg)
    cfg.write_text('[bench]\nfoo = 1\n')
    with pytest.raises(ConfigError, match="foo"):
        load_config(cfg)


def test_compare_ratio_and_target():
    run = {"prompt_len": 0, "output_len": 8, "concurrency": 4, "completed": 4}
    results = {
        "config": {"bench": {"output_len": [8], "prompt_len": [0]},
                   "comparisons": [{"name": "c", "candidate": "a", "baseline": "b", "metric": "output_throughput",
                                    "concurrency": 4, "target": ">= 0.95", "output_len": None,
                                    "prompt_len": None}]},
        "runs": [{**run, "label": "a", "output_throughput": 90.0}, {**run, "label": "b", "output_throughput": 100.0}],
    }
    (row,) = compare(results)
    assert row["ratio"] == pytest.approx(0.9) and row["met"] is False
    results["runs"][0]["completed"] = 0  # a failed run gives no ratio, not a fake one
    assert compare(results)[0]["ratio"] is None


def test_interleaved_rounds_pair_their_ratios():
    """With rounds, a point is the median over rounds and a comparison the median of the ratios
    of the same round: drift that slows round 2 for both servers cancels."""
    def run(label, rnd, tput):
        return {"label": label, "prompt_len": 0, "output_len": 8, "concurrency": 4, "completed": 4,
                "failed": 0, "round": rnd, "output_throughput": tput}
    by_round = [run("a", 0, 90.0), run("b", 0, 100.0), run("a", 1, 45.0), run("b", 1, 50.0),
                run("a", 2, 80.0), run("b", 2, 100.0)]
    runs = median_over_rounds(by_round)
    a = next(r for r in runs if r["label"] == "a")
    assert a["output_throughput"] == 80.0 and a["completed"] == 12 and len(a["rounds"]) == 3
    results = {"config": {"bench": {"output_len": [8], "prompt_len": [0]},
                          "comparisons": [{"name": "c", "candidate": "a", "baseline": "b",
                                           "metric": "output_throughput", "concurrency": 4, "target": ">= 0.85",
                                           "output_len": None, "prompt_len": None}]},
               "runs": runs}
    (row,) = compare(results)
    assert row["round_ratios"] == pytest.approx([0.9, 0.9, 0.8])
    assert row["ratio"] == pytest.approx(0.9) and row["met"] is True  # medians alone give 80/100


def test_args_decoder_streams_tokens(tiny_model_dir, tiny_scorer_dir):
    from benchmarks.baselines.args_server import ArgsDecoder

    dec = ArgsDecoder(str(tiny_model_dir), str(tiny_scorer_dir), default_strength=2.0, default_top_k=5)
    prompt = dec.prompt_ids([{"role": "user", "content": "Say something kind."}])
    pieces: list[str] = []
    n, finish = dec.generate(prompt, 6, {"weights": {"positive": 1.0}}, 0.0, pieces.append)
    assert 1 <= n <= 6 and finish in ("stop", "length")
    assert len(pieces) == n - (finish == "stop")


def test_long_prompt_contexts_are_distinct_unless_shared(tmp_path, tiny_model_dir):
    """Long-prompt runs must cost their prefill: by default no two requests share the context
    passage (prefix caching could otherwise serve it once); shared_context gives them one."""
    from benchmarks.load.dataset import write_prompts
    from prefix_scorers.base_model import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    src = tmp_path / "src.jsonl"
    src.write_text('{"prompt": "Tell me about rain."}\n{"prompt": "Review a pizza place."}\n')

    def contexts(shared: bool) -> list[str]:
        out = write_prompts(src, tmp_path / f"p{shared}.jsonl", 5, tok, 64, shared=shared)
        return [json.loads(line)["prompt"].split("\n\n")[0] for line in out.read_text().splitlines()]

    distinct, shared = contexts(False), contexts(True)
    assert len(set(distinct)) == 5 and len(set(shared)) == 1
    assert all(abs(len(tok(c, add_special_tokens=False).input_ids) - 64) <= 8 for c in distinct + shared)
