"""Prometheus: the Compose config and the alert rules pass promtool, the rules' unit tests pass,
and every series the rules read is one the server exports."""

from __future__ import annotations

import subprocess

import yaml
from deploy_helpers import (
    BUILTIN_SERIES,
    PROMETHEUS_CONFIG,
    RULE_TESTS,
    RULES,
    SERIES,
    metric_names,
    rules_exprs,
    tool,
)


def promtool(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [tool("promtool"), *args], check=False, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


def test_config_is_valid_and_loads_the_rules():
    out = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert "1 rule files found" in out.stdout + out.stderr


def test_rules_are_valid():
    promtool("check", "rules", str(RULES))


def test_rules_unit_tests_pass():
    promtool("test", "rules", str(RULE_TESTS))


def test_promtool_rejects_a_broken_rule(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: rate(foo[5m]\n"
    )
    out = subprocess.run(
        [tool("promtool"), "check", "rules", str(bad)], check=False, capture_output=True, timeout=60
    )
    assert out.returncode != 0


def test_rules_read_only_exported_series():
    exprs, recorded = rules_exprs(yaml.safe_load(RULES.read_text()))
    used = set().union(*(metric_names(e) for e in exprs))
    assert used <= SERIES | BUILTIN_SERIES | recorded, sorted(
        used - SERIES - BUILTIN_SERIES - recorded
    )


def test_every_alert_is_unit_tested():
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])}
    assert tested == alerts


def test_scrape_target_is_the_compose_service():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "cdserve"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["cdserve:8000"]
