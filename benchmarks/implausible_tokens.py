"""How many of an answer's tokens the base model found implausible: for runs of the quality
benchmark's cache, the share of answer tokens whose base probability (temperature 1, the same
prompt and answer so far) is under each fraction of that step's most likely token's. The measure
behind control.plausibility (benchmarks/RESULTS.md): made-up words are spelt from such tokens.

    python -m benchmarks.implausible_tokens --runs 'none;token s=4 top_k=100 [specific=1]'

Run names are the report's (benchmarks.quality.runs.name). Answers are re-tokenised from their
text, as the report's perplexity does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.quality.runs import name
from prefix_scorers.base_model import default_cache_dir, load_model, load_tokenizer, resolve_model
from prefix_scorers.rollouts import chat_prompt_ids

HERE = Path(__file__).resolve().parent


def relative_logprobs(model, tok, prompt: str, text: str) -> torch.Tensor:
    """log p(token) - log p(top token) at each answer token, under the base model."""
    head = chat_prompt_ids(tok, prompt)
    answer = tok(text, add_special_tokens=False)["input_ids"]
    if not answer:
        return torch.empty(0)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([head + answer])).logits[0].float(), -1)
    pos = torch.arange(len(head) - 1, len(head) + len(answer) - 1)
    return logp[pos, torch.tensor(answer)] - logp[pos].max(-1).values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(HERE / "results" / "quality.json"))
    ap.add_argument("--runs", required=True, help="';'-separated run names, as in the report's table")
    ap.add_argument("--fractions", default="0.1,0.05,0.02,0.01,0.001")
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    runs = {name(r): r for r in json.loads(Path(args.results).read_text())["runs"]
            if "samples_per_prompt" not in r and "max_tokens" not in r}
    folder = resolve_model("smollm2", default_cache_dir())
    tok, model = load_tokenizer(folder), load_model(folder, dtype=torch.float32)
    out = {}
    for run_name in args.runs.split(";"):
        run = runs[run_name]
        rel = torch.cat([relative_logprobs(model, tok, s["prompt"], s["text"]) for s in run["samples"]])
        out[run_name] = {"tokens": len(rel), **{f"under_{f:g}": round(float((rel < torch.tensor(f).log()).float()
                                                                         .mean()), 4) for f in fractions}}
        print(run_name, json.dumps(out[run_name]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
