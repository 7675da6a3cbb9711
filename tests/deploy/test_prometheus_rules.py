"""The Prometheus alert rules and the Grafana dashboard under deploy/, checked with the real
`promtool` (Debian's `prometheus` package, which .ci/run installs): the rules pass
`promtool check rules`, each alert has a unit test that both fires and stays silent under
`promtool test rules`, and every dashboard query is valid PromQL. Which metric names they
use is checked against a real /metrics in tests/api/test_drift_metrics.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "resnet-serve.json"
ALERTS = {"ResnetServeModelDrift", "ResnetServeUnknownRateHigh", "ResnetServeNoTraffic"}
# what the dashboard shows, each by a metric its queries must use
DASHBOARD_TOPICS = {
    "throughput": "resnet_serve_images_total", "latency": "resnet_serve_request_duration_seconds",
    "batch sizes": "resnet_serve_batch_size", "queue": "resnet_serve_queue_depth",
    "errors": "resnet_serve_requests_total", "drift": "resnet_serve_drift_psi",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run does)")
    return found


def _promtool(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard's panels."""
    data = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in data["panels"] for target in panel.get("targets", [])]


def test_the_alert_rules_pass_promtool_check(promtool: str) -> None:
    done = _promtool(promtool, "check", "rules", RULES.name, cwd=PROMETHEUS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout


def test_each_alert_fires_and_stays_silent_in_its_promtool_unit_test(promtool: str) -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert alerts == ALERTS
    cases: dict[str, list[Any]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], []).append(case["exp_alerts"])
    for alert in ALERTS:  # each one expected to fire somewhere and to be silent somewhere
        assert any(cases.get(alert, [])) and not all(cases[alert]), alert
    done = _promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=PROMETHEUS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_dashboard_covers_the_service_in_valid_promql(promtool: str, tmp_path: Path
                                                          ) -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] and data["title"] and data["panels"]
    queries = dashboard_queries()
    for topic, name in DASHBOARD_TOPICS.items():
        assert any(name in query for query in queries), f"no panel shows {topic} ({name})"
    # promtool parses each query as a recording rule (Grafana's $__rate_interval made 5m)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": query.replace("$__rate_interval", "5m")}
        for i, query in enumerate(queries)]}]}
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    done = _promtool(promtool, "check", "rules", "queries.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_installs_promtool() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    installs = re.findall(r"apt-get install[^\n]*", script)
    assert any(re.search(r"\bprometheus\b", line) for line in installs), installs
