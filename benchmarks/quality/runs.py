"""Names of the quality benchmark's runs (one per control setting), shared by the runner and the report."""

from __future__ import annotations


def label(r: dict) -> str:
    suffix = "".join([f" max_tokens={r['max_tokens']}" if "max_tokens" in r else "",
                      " reward-ranked" if r.get("rewards") else "",
                      f" pruned every {r['prune_every']} keep {r['keep_fraction']:g}" if r.get("prune_every") else ""])
    if r["mode"] == "none":
        return (f"none x{r['samples_per_prompt']} samples" if "samples_per_prompt" in r else "none") + suffix
    if r["mode"] == "token":
        s = f"s={r['strength']:g}" if "strength" in r else "default strength"
        return f"token {s}" + (f" top_k={r['top_k']}" if "top_k" in r else "") + suffix
    if r["mode"] == "block":
        seg = r.get("segment", "fixed")
        size = f"M={r['block_size']}" if seg == "fixed" else f"{seg} segments (max {r['block_size']})"
        return f"block K={r['num_candidates']} {size}" + suffix
    return f"best_of_n N={r['num_candidates']}" + suffix
