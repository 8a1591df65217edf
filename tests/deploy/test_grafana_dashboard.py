"""Grafana: the provisioned dashboard parses, shows what an operator needs by control mode, and
its queries read only series the server exports (tests/deploy/test_live_metrics.py checks the
same names against a running server)."""

from __future__ import annotations

import json

import pytest
import yaml
from deploy_helpers import (
    BUILTIN_SERIES,
    COMPOSE,
    DASHBOARD,
    MONITORING,
    SERIES,
    dashboard_exprs,
    metric_names,
)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard):
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])


def test_queries_read_only_exported_series(dashboard):
    for expr in dashboard_exprs(dashboard):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= SERIES | BUILTIN_SERIES, (
            f"{sorted(names - SERIES - BUILTIN_SERIES)} in {expr!r}"
        )


@pytest.mark.parametrize(
    "series, by_mode",
    [
        ("cdserve_requests_total", True),  # request rate, errors
        ("cdserve_queue_depth", False),
        ("cdserve_requests_in_flight", False),
        ("cdserve_time_to_first_token_seconds_bucket", True),  # TTFT percentiles
        ("cdserve_time_per_output_token_seconds_bucket", True),  # per-token latency percentiles
        ("cdserve_e2e_request_latency_seconds_bucket", True),
        ("cdserve_generation_tokens_total", True),  # tokens/s
        ("cdserve_scorer_step_seconds_bucket", False),  # scorer time
        ("cdserve_scorer_step_seconds_sum", False),
    ],
)
def test_dashboard_shows(dashboard, series, by_mode):
    exprs = [e for e in dashboard_exprs(dashboard) if series in metric_names(e)]
    assert exprs, f"no panel reads {series}"
    if by_mode:
        assert any("by (mode" in e for e in exprs), f"{series} is never split by control mode"


def test_percentiles_are_p50_p90_p99(dashboard):
    for series in (
        "cdserve_time_to_first_token_seconds_bucket",
        "cdserve_time_per_output_token_seconds_bucket",
    ):
        qs = {e.split(",")[0] for e in dashboard_exprs(dashboard) if series in metric_names(e)}
        assert qs == {f"histogram_quantile({q}" for q in ("0.5", "0.9", "0.99")}


def test_panels_are_well_formed(dashboard):
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "mode", "instance"} <= variables
    for p in panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"][
            "w"
        ] <= 24
        for t in p["targets"]:
            if "mode" in metric_names(t["expr"]) or "$mode" in t["expr"]:
                assert 'mode=~"$mode"' in t["expr"]


def test_provisioning_points_at_the_dashboard_and_prometheus():
    compose = yaml.safe_load(COMPOSE.read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(
        v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("../")
    )
    base = COMPOSE.parent
    for host in mounts:
        assert (base / host).resolve().is_dir(), host
    provider = yaml.safe_load(
        (MONITORING / "grafana/provisioning/dashboards/cdserve.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    host_dir = next(h for h, c in mounts.items() if c == path)
    assert (base / host_dir / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    sources = yaml.safe_load(
        (MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (ds,) = sources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


def test_metric_names_parser():
    assert metric_names('sum by (mode, le) (rate(a_bucket{mode=~"$mode"}[$__rate_interval]))') == {
        "a_bucket"
    }
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(x_bucket[5m]))) / b") == {
        "x_bucket",
        "b",
    }
    assert metric_names('count(up{job=~"(.*/)?cdserve"} == 1)') == {"up"}
    assert metric_names("cdserve:error_ratio:rate5m > 0.05") == {"cdserve:error_ratio:rate5m"}
