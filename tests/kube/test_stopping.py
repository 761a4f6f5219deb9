"""Before a pod goes (pure): whether to wait for the final checkpoint, for how long, and what the Events say."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from hogwild.operator import status, stopping
from hogwild.operator.status import Observation, PodFacts, WorkerFacts

RUNNING = PodFacts(
    name="chat", phase="Running", scheduled=True, ip="10.0.0.7", vllm_ready=True, trainer_running=True
)
OBS = Observation(generation=2, spec_hash="h", pod_name="chat", endpoint="http://chat:8000", pod=RUNNING)
NOW = "2026-12-03T12:00:00Z"
BOUND = stopping.bound(300, 300)


def recorded(**changes: Any) -> dict[str, Any]:
    """The status as the last reconcile wrote it."""
    return status.compute_status({}, replace(OBS, pod_current=True, **changes), NOW)


CONNECTED = recorded(worker=WorkerFacts(connected=True, step=40))
PLANS: list[tuple[str, dict[str, Any], PodFacts | None, dict[str, Any], str | None]] = [
    ("reachable", CONNECTED, RUNNING, {}, None),
    ("never-checked", {}, RUNNING, {}, None),
    ("no-pod", CONNECTED, None, {}, "there is no pod"),
    ("pod-deleting", CONNECTED, replace(RUNNING, terminating=True), {}, "already being deleted"),
    ("pod-pending", CONNECTED, replace(RUNNING, phase="Pending"), {}, "not running (Pending)"),
    ("pod-failed", CONNECTED, replace(RUNNING, phase="Failed"), {}, "not running (Failed)"),
    (
        "pvc-deleting",
        CONNECTED,
        RUNNING,
        {"pvc_terminating": "chat-checkpoints"},
        "chat-checkpoints is being deleted",
    ),
    ("no-trainer", CONNECTED, RUNNING, {"worker_addressable": False}, "trainer container is not running"),
    (
        "unreachable",
        recorded(worker_error="timeout: the training worker did not answer status within 5 s"),
        RUNNING,
        {},
        "did not answer the last status check (timeout: the training worker did not answer status within 5 s)",
    ),
    ("no-weights", recorded(worker=WorkerFacts(connected=False)), RUNNING, {}, "no weights mapped"),
    ("operator-off", CONNECTED, RUNNING, {"wait": stopping.bound(300, 0)}, "--final-checkpoint-timeout is 0"),
]


@pytest.mark.parametrize(
    ("previous", "pod", "given", "skip"), [p[1:] for p in PLANS], ids=[p[0] for p in PLANS]
)
def test_nothing_is_waited_for_that_is_known_not_to_come(
    previous: dict[str, Any], pod: PodFacts | None, given: dict[str, Any], skip: str | None
) -> None:
    args: dict[str, Any] = {"worker_addressable": True, "wait": BOUND, **given}
    plan = stopping.plan(previous, pod, **args)
    if skip is None:
        assert plan == stopping.Plan(wait_s=300)
    else:
        assert plan.wait_s == 0 and skip in str(plan.skip)


BOUNDS = [
    ("spec-shorter", 60, 300, 60, False),
    ("operator-shorter", 900, 300, 300, True),
    ("equal", 300, 300, 300, False),
    ("operator-off", 300, 0, 0, True),
]


@pytest.mark.parametrize(
    ("spec_s", "operator_s", "wait_s", "capped"), [b[1:] for b in BOUNDS], ids=[b[0] for b in BOUNDS]
)
def test_the_wait_is_the_shorter_of_the_spec_and_the_operator_limit(
    spec_s: float, operator_s: float, wait_s: float, capped: bool
) -> None:
    wait = stopping.bound(spec_s, operator_s)
    assert (wait.wait_s, wait.capped) == (wait_s, capped)


def test_the_waiting_event_names_the_checkpoint_its_bound_and_its_deadline() -> None:
    text = stopping.waiting_event("replacing pod chat", stopping.bound(900, 300), NOW, "the spec changed")
    assert text == (
        "waiting up to 300 s, until 2026-12-03T12:00:00Z, for the final checkpoint before replacing pod chat "
        "(the spec changed); 300 s is the operator's --final-checkpoint-timeout (the spec asks 900 s)"
    )


LOSSES = [
    (
        "checkpointed",
        {"lastCheckpoint": {"step": 40, "path": "/var/lib/hogwild/step-00000040"}},
        "since the last checkpoint (step 40)",
    ),
    ("never", {}, "everything trained so far may be lost (no checkpoint yet)"),
]


@pytest.mark.parametrize(("previous", "says"), [x[1:] for x in LOSSES], ids=[x[0] for x in LOSSES])
def test_a_skipped_checkpoint_says_what_may_be_lost(previous: dict[str, Any], says: str) -> None:
    text = stopping.skipped_event("deleting pod chat", "there is no trainer", previous)
    assert text.startswith("no final checkpoint before deleting pod chat: there is no trainer; ")
    assert says in text
