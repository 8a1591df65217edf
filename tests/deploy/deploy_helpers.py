"""Shared by the deploy checks: paths, the metric contract, the offline tools, PromQL parsing."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
MONITORING = DEPLOY / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
RULES = MONITORING / "prometheus" / "rules" / "cdserve.yml"
RULE_TESTS = MONITORING / "prometheus" / "tests" / "cdserve.test.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "cdserve.json"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
OVERLAYS = sorted(p.parent for p in (KUBERNETES / "overlays").glob("*/kustomization.yaml"))

# The metrics the server exports (cdserve/server/metrics.py); the dashboards and alerts may use
# these and nothing else of cdserve's. Kind decides the series names in /metrics.
METRICS = {
    "cdserve_requests_total": "counter",
    "cdserve_queue_depth": "gauge",
    "cdserve_requests_in_flight": "gauge",
    "cdserve_time_to_first_token_seconds": "histogram",
    "cdserve_time_per_output_token_seconds": "histogram",
    "cdserve_e2e_request_latency_seconds": "histogram",
    "cdserve_prompt_tokens_total": "counter",
    "cdserve_generation_tokens_total": "counter",
    "cdserve_scorer_step_seconds": "histogram",
    "cdserve_engine_step_seconds": "histogram",
    "cdserve_candidates_generated_total": "counter",
    "cdserve_prefill_tokens_total": "counter",
    "cdserve_kv_forked_tokens_total": "counter",
    "cdserve_batch_rows": "gauge",
}
# Series a query may name: gauges and counters as they are, histograms by their three series.
SERIES = {name for name, kind in METRICS.items() if kind != "histogram"} | {
    name + suffix
    for name, kind in METRICS.items()
    if kind == "histogram"
    for suffix in ("_bucket", "_sum", "_count")
}
# Prometheus's own series that the alerts and dashboard use.
BUILTIN_SERIES = {"up"}

# Not metric names: PromQL functions, aggregators, keywords (what the queries here use and more).
_PROMQL_WORDS = {
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "histogram_quantile",
    "avg_over_time",
    "max_over_time",
    "min_over_time",
    "sum_over_time",
    "count_over_time",
    "last_over_time",
    "quantile_over_time",
    "abs",
    "ceil",
    "floor",
    "round",
    "clamp",
    "clamp_min",
    "clamp_max",
    "vector",
    "scalar",
    "time",
    "absent",
    "absent_over_time",
    "label_replace",
    "label_join",
    "sort",
    "sort_desc",
    "predict_linear",
    "changes",
    "resets",
    "exp",
    "ln",
    "log2",
    "log10",
    "sqrt",
    "timestamp",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (Grafana variables allowed in it)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^{}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\w+|\$\{\w+\}", "", s)  # Grafana variables
    s = re.sub(r"\b\d+(\.\d+)?([eE][-+]?\d+)?\b", " ", s)  # numbers
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s))
    return {w for w in words if w not in _PROMQL_WORDS}


def dashboard_exprs(dashboard: dict) -> list[str]:
    """Every PromQL expression of a Grafana dashboard: panel targets, nested rows, variables."""
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", q)
            exprs.append(m.group(1) if m else q)
    return exprs


def rules_exprs(rules: dict) -> tuple[list[str], set[str]]:
    """(every rule expression, the names the recording rules define)."""
    exprs, recorded = [], set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            exprs.append(rule["expr"])
            if "record" in rule:
                recorded.add(rule["record"])
    return exprs, recorded


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def tool(name: str) -> str:
    """Path of an offline checker: the venv's bin first, then PATH. deploy/install-tools.sh
    installs them all; in CI a missing one fails the check instead of skipping it."""
    venv_bin = Path(sys.executable).parent
    found = shutil.which(name, path=str(venv_bin)) or shutil.which(name)
    if found:
        return found
    msg = f"{name} is not installed: run deploy/install-tools.sh"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)
