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
    "HogwildReplicasOutOfSync": "warning",
    "HogwildTrainingShareBelowFloor": "warning",
    "HogwildUpdatesReverted": "warning",
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


# ---- HogwildCheckpointTooOld: training unsaved for longer than three of the session's own intervals ----------
CASE_MINUTES = 240  # evaluated at 4 h: room for an unsaved age of 3.2 h plus the alert's `for` (10m)
EVAL_S = CASE_MINUTES * 60


@dataclass(frozen=True)
class CheckpointCase:
    interval_s: int
    unsaved_age_s: int | None  # how long the served weights have held unsaved steps; None: nothing unsaved
    fires_after: str | None  # the summary's duration when the alert fires, None when it stays quiet
    # held: the age is held at unsaved_age_s for the whole case (the gauge moves with the clock), which tests
    # the threshold alone with `for` met. Not held: the first unsaved step really was applied unsaved_age_s
    # before the evaluation (the gauge is 0 until then, then constant), `for` included.
    held: bool = True


CHECKPOINT_CASES = [
    pytest.param(CheckpointCase(60, 168, None), id="1min-interval-2.8x-quiet"),
    pytest.param(CheckpointCase(60, 192, "3m 12s"), id="1min-interval-3.2x-fires"),
    pytest.param(CheckpointCase(600, 1680, None), id="10min-interval-2.8x-quiet"),
    pytest.param(CheckpointCase(600, 1920, "32m 0s"), id="10min-interval-3.2x-fires"),
    pytest.param(CheckpointCase(3600, 10080, None), id="1h-interval-2.8x-quiet"),
    pytest.param(CheckpointCase(3600, 11520, "3h 12m 0s"), id="1h-interval-3.2x-fires"),
    # A new session (no checkpoint yet) whose first step was 20 minutes ago: what fired falsely when the
    # rule measured the age of a checkpoint that did not exist (timestamp 0).
    pytest.param(CheckpointCase(3600, 1200, None, held=False), id="new-session-first-step-20min-ago-quiet"),
    pytest.param(CheckpointCase(600, 2700, "45m 0s", held=False), id="10min-interval-unsaved-45min-fires"),
    # Over the threshold (30 min) for only 5 minutes: pending, not firing.
    pytest.param(CheckpointCase(600, 2100, None, held=False), id="10min-interval-before-for-passes-quiet"),
    pytest.param(CheckpointCase(60, None, None), id="nothing-unsaved-quiet"),
    pytest.param(CheckpointCase(0, 7200, None), id="interval-off-unsaved-2h-quiet"),
    pytest.param(CheckpointCase(0, 1200, None, held=False), id="interval-off-new-session-quiet"),
]


def unsaved_since_values(case: CheckpointCase) -> str:
    """hogwild_worker_unsaved_since_timestamp_seconds, one sample a minute from 0 to EVAL_S."""
    n = CASE_MINUTES
    if case.unsaved_age_s is None:
        return f"0x{n}"
    if case.held:  # at time t the gauge is t - age (negative early on: `> 0` drops those samples)
        return f"{-case.unsaved_age_s}+60x{n}"
    since = EVAL_S - case.unsaved_age_s
    assert since % 60 == 0 and 0 < since < EVAL_S, case
    first = since // 60  # the minute of the first unsaved step
    return f"0x{first - 1} {since}x{n - first}"


def checkpoint_case_file(case: CheckpointCase) -> dict[str, Any]:
    """A promtool test of one session, evaluated at EVAL_S."""
    labels = '{namespace="ml", session="s"}'
    expected: list[dict[str, Any]] = []
    if case.fires_after is not None:
        annotations = {
            "summary": f"ml/s holds training unsaved for {case.fires_after}",
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
                        "values": f"{case.interval_s}x{CASE_MINUTES}",
                    },
                    {
                        "series": f"hogwild_worker_unsaved_since_timestamp_seconds{labels}",
                        "values": unsaved_since_values(case),
                    },
                    # No checkpoint ever written: the rule must not care.
                    {
                        "series": f"hogwild_worker_last_checkpoint_timestamp{labels}",
                        "values": f"0x{CASE_MINUTES}",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": f"{CASE_MINUTES}m",
                        "alertname": "HogwildCheckpointTooOld",
                        "exp_alerts": expected,
                    }
                ],
            }
        ],
    }


def test_the_held_series_really_hold_the_age() -> None:
    """Guards the table: the last sample of a held series is EVAL_S - age, a delayed one starts on time."""
    held = unsaved_since_values(CheckpointCase(600, 1920, None)).split("+")
    assert int(held[0]) + 60 * CASE_MINUTES == EVAL_S - 1920
    delayed = unsaved_since_values(CheckpointCase(3600, 1200, None, held=False)).split()
    zeros, value = (int(x) for x in delayed[0].split("x")), delayed[1].split("x")
    assert sum(zeros) + 1 == (EVAL_S - 1200) // 60  # 0 at minutes 0 .. 219
    assert int(value[0]) == EVAL_S - 1200 and int(value[1]) == CASE_MINUTES - 220


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_checkpoint_too_old_fires_past_three_of_the_sessions_intervals(
    case: CheckpointCase, tmp_path: Path
) -> None:
    tests = tmp_path / "checkpoint-case.test.yaml"
    tests.write_text(yaml.safe_dump(checkpoint_case_file(case)))
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
