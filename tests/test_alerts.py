"""hogwild's alert rules (charts/hogwild/rules/hogwild-alerts.yaml), checked and unit-tested by promtool.

`promtool test rules` runs tests/fixtures/promtool/hogwild-alerts.test.yaml: synthetic series for several
sessions, where each alert must fire for exactly the session that deserves it, with its labels and rendered
annotations, and stay quiet before its `for` has passed. The tests here also make sure that file keeps
covering every alert both ways. promtool comes from Debian's `prometheus` package (scripts/install_tools.py).
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from monitoring_helpers import (
    PROMTOOL_TESTS,
    RULES_FILE,
    AlertRule,
    alert_rules,
    known_metric_names,
    metric_names,
    system_tool,
)

ALERTS = {
    "HogwildTrainingStalled": "warning",
    "HogwildCheckpointTooOld": "warning",
    "HogwildSkippedStepsHigh": "warning",
    "HogwildWorkerDisconnected": "critical",
    "HogwildServingSlowdown": "warning",
}
RULES = alert_rules()
RULE_IDS = [rule.name for rule in RULES]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [system_tool("promtool"), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=PROMTOOL_TESTS.parent,
    )


def test_the_issue_alerts_exist_with_their_severity() -> None:
    assert {rule.name: rule.labels.get("severity") for rule in RULES} == ALERTS


def test_promtool_check_rules_passes() -> None:
    result = promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", PROMTOOL_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def promtool_cases(alert: str) -> list[list[object]]:
    """The expected alert lists of every promtool case about `alert`."""
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
    return [
        case["exp_alerts"]
        for group in tests
        for case in group.get("alert_rule_test", [])
        if case["alertname"] == alert
    ]


@pytest.mark.parametrize("alert", list(ALERTS))
def test_promtool_cases_cover_firing_and_quiet(alert: str) -> None:
    cases = promtool_cases(alert)
    assert any(cases), f"no promtool case where {alert} fires"
    assert any(expected == [] for expected in cases), f"no promtool case where {alert} stays quiet"


@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_alert_names_only_exported_metrics(rule: AlertRule) -> None:
    names = metric_names(rule.expr)
    assert names, rule.expr
    assert not names - known_metric_names(), (
        f"not exported by hogwild or vLLM: {names - known_metric_names()}"
    )


@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_alert_says_which_session_and_what_to_do(rule: AlertRule) -> None:
    assert "{{ $labels.namespace }}/{{ $labels.session }}" in rule.annotations["summary"]
    assert len(rule.annotations["description"]) > 60
