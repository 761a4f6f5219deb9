"""The replicas bench's pure part: from the workers' step_applied events to step intervals and replica skew.
The bench itself (real workers over gloo) is not a test; this keeps its arithmetic honest."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.replicas import applied_at, percentile, skews, step_intervals, summary  # noqa: E402


def test_applied_at_keeps_only_step_applied_events() -> None:
    events = [
        {"event": "started", "ts": 1.0},
        {"event": "step_applied", "step": 1, "ts": 2.0},
        {"event": "group_formed", "step": 1, "ts": 2.5},
        {"event": "step_applied", "step": 2, "ts": 3.0},
        {"msg": "a line without an event"},
    ]
    assert applied_at(events) == {1: 2.0, 2: 3.0}


@pytest.mark.parametrize(("members", "steps", "expected"), [
    ([{1: 10.0, 2: 11.0}], [1, 2], [0.0, 0.0]),                           # a lone member never differs
    ([{1: 10.0, 2: 11.0}, {1: 10.002, 2: 10.999}], [1, 2], [0.002, 0.001]),  # either member may be first
    ([{1: 10.0}, {1: 10.1}, {1: 10.05}], [1], [0.1]),                     # latest minus earliest of three
    ([{1: 10.0, 2: 11.0}, {2: 11.0}], [1, 2], [0.0]),                     # a step one member lacks is left out
    ([{1: 10.0}], [1, 2], [0.0]),                                         # a step outside the log: none
], ids=["alone", "two", "three", "missing-member", "missing-step"])  # fmt: skip
def test_skews(members: list[dict[int, float]], steps: list[int], expected: list[float]) -> None:
    assert skews(members, steps) == pytest.approx(expected)


@pytest.mark.parametrize(("applied", "steps", "expected"), [
    ({1: 10.0, 2: 10.5, 3: 11.25}, [1, 2, 3], [0.5, 0.75]),
    ({1: 10.0, 2: 10.5, 3: 11.25}, [2, 3], [0.75]),     # the run's first step has no predecessor in it
    ({1: 10.0, 3: 11.0}, [1, 2, 3], []),                # no pair of consecutive steps both logged
], ids=["run", "later-run", "gap"])  # fmt: skip
def test_step_intervals(applied: dict[int, float], steps: list[int], expected: list[float]) -> None:
    assert step_intervals(applied, steps) == pytest.approx(expected)


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([5.0], 90, 5.0),
    ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 90, 9.0),
    ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0], 90, 10.0),
    ([3.0, 1.0, 2.0], 50, 2.0),
    ([3.0, 1.0, 2.0], 100, 3.0),
], ids=["one", "ten", "eleven", "median-unsorted", "max"])  # fmt: skip
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == expected


def test_summary_of_nothing_is_nan_not_an_error() -> None:
    empty = summary([])
    assert empty["n"] == 0 and math.isnan(empty["median"]) and math.isnan(empty["max"])
    assert summary([0.001, 0.003, 0.002]) == {"median": 0.002, "p90": 0.003, "max": 0.003, "n": 3}
