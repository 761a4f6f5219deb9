"""hogwild's alert rules (charts/hogwild/rules/hogwild-alerts.yaml), checked and unit-tested by promtool.

`promtool test rules` runs tests/fixtures/promtool/hogwild-alerts.test.yaml: synthetic series for several
sessions, where each alert must fire for exactly the session that deserves it, with its labels and rendered
annotations, and stay quiet before its `for` has passed. The tests here also make sure that file keeps
covering every alert both ways. promtool comes from Debian's `prometheus` package (scripts/install_tools.py).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
RULE_BY_NAME = {rule.name: rule for rule in RULES}


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


# ---- HogwildCheckpointTooOld: the threshold is three of the session's own checkpoint intervals ----------------
CHECKPOINT_CASE_MINUTES = 40  # the alert's `for` (10m) and its 30-minute step window both fit


@dataclass(frozen=True)
class CheckpointCase:
    interval_s: int
    age_s: int  # how old the newest checkpoint is, held for the whole case
    fires_after: str | None  # the summary's duration when the alert fires, None when it stays quiet
    unsaved: bool = True  # trained_since_checkpoint
    training: bool = True  # steps applied in the last 30 minutes


CHECKPOINT_CASES = [
    pytest.param(CheckpointCase(60, 160, None), id="1min-interval-2.7x-quiet"),
    pytest.param(CheckpointCase(60, 200, "3m 20s"), id="1min-interval-3.3x-fires"),
    pytest.param(CheckpointCase(600, 1700, None), id="10min-interval-2.8x-quiet"),
    pytest.param(CheckpointCase(600, 1900, "31m 40s"), id="10min-interval-3.2x-fires"),
    pytest.param(CheckpointCase(3600, 2000, None), id="1h-interval-past-the-old-fixed-30min-quiet"),
    pytest.param(CheckpointCase(3600, 10000, None), id="1h-interval-2.8x-quiet"),
    pytest.param(CheckpointCase(3600, 11000, "3h 3m 20s"), id="1h-interval-3.1x-fires"),
    pytest.param(CheckpointCase(0, 100_000, None), id="interval-off-never-fires"),
    pytest.param(CheckpointCase(60, 600, None, unsaved=False), id="old-but-nothing-unsaved-quiet"),
    pytest.param(CheckpointCase(60, 600, None, training=False), id="old-but-no-recent-steps-quiet"),
]


def checkpoint_case_file(case: CheckpointCase) -> dict[str, Any]:
    """A promtool test of one session whose newest checkpoint is always `age_s` old at evaluation."""
    n = CHECKPOINT_CASE_MINUTES
    labels = '{namespace="ml", session="s"}'
    expected: list[dict[str, Any]] = []
    if case.fires_after is not None:
        annotations = {
            "summary": f"ml/s has not checkpointed for {case.fires_after}",
            "description": RULE_BY_NAME["HogwildCheckpointTooOld"].annotations["description"],
        }
        labels_out = {"severity": "warning", "namespace": "ml", "session": "s"}
        expected.append({"exp_labels": labels_out, "exp_annotations": annotations})
    return {
        "rule_files": [str(RULES_FILE)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f"hogwild_worker_checkpoint_interval_seconds{labels}",
                        "values": f"{case.interval_s}x{n}",
                    },
                    # The timestamp moves with the clock (samples every 60 s), so the age stays age_s.
                    {
                        "series": f"hogwild_worker_last_checkpoint_timestamp{labels}",
                        "values": f"{-case.age_s}+60x{n}",
                    },
                    {
                        "series": f"hogwild_worker_trained_since_checkpoint{labels}",
                        "values": f"{int(case.unsaved)}x{n}",
                    },
                    {
                        "series": f"hogwild_worker_steps_total{labels}",
                        "values": f"0+1x{n}" if case.training else f"5x{n}",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": f"{n}m", "alertname": "HogwildCheckpointTooOld", "exp_alerts": expected}
                ],
            }
        ],
    }


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_checkpoint_too_old_fires_past_three_of_the_sessions_intervals(
    case: CheckpointCase, tmp_path: Path
) -> None:
    tests = tmp_path / "checkpoint-case.test.yaml"
    tests.write_text(yaml.safe_dump(checkpoint_case_file(case)))
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
