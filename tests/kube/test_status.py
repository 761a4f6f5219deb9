"""Phase, conditions and training figures from observed facts (pure): what `kubectl get ts` would show."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from hogwild.config import TrainingConfig, config_to_dict
from hogwild.operator import status
from hogwild.operator.status import CheckpointInfo, Observation, PodFacts, WorkerFacts

NOW = "2026-11-26T12:00:00Z"
LATER = "2026-11-26T12:05:00Z"
BASE = Observation(generation=3, spec_hash="h1", pod_name="chat", endpoint="http://chat.ml.svc:8000")
RUNNING = PodFacts(
    name="chat", phase="Running", scheduled=True, ip="10.0.0.7", vllm_ready=True, trainer_running=True
)
CONFIG = config_to_dict(TrainingConfig())
WORKER = WorkerFacts(connected=True, step=12, tokens_trained=3400, loss=1.25, skipped_steps=0, config=CONFIG)


def obs(**changes: Any) -> Observation:
    return replace(BASE, **changes)


def conditions(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in result["conditions"]}


PHASES = [
    ("deleting", obs(deleting=True, pod=RUNNING, pod_current=True, worker=WORKER), None, "Terminating"),
    ("bad-spec", obs(spec_error="spec.gpu.count: v1alpha1 supports one GPU"), None, "Failed"),
    ("missing-secret", obs(waiting="waiting for Secret keys"), None, "Pending"),
    ("replacing", obs(restarting="the spec changed", pod=RUNNING), "Training", "Restarting"),
    ("no-pod", obs(), None, "Pending"),
    ("unscheduled", obs(pod=PodFacts(name="chat"), pod_current=True), None, "Pending"),
    ("pod-failed", obs(pod=replace(RUNNING, phase="Failed"), pod_current=True), "Training", "Restarting"),
    (
        "image-pull",
        obs(pod=replace(RUNNING, stuck="vllm: ImagePullBackOff"), pod_current=True),
        "Starting",
        "Degraded",
    ),
    ("loading", obs(pod=replace(RUNNING, vllm_ready=False), pod_current=True), "Pending", "Starting"),
    ("vllm-lost", obs(pod=replace(RUNNING, vllm_ready=False), pod_current=True), "Training", "Degraded"),
    ("worker-starting", obs(pod=RUNNING, pod_current=True, worker_error="timeout"), "Starting", "Serving"),
    ("worker-lost", obs(pod=RUNNING, pod_current=True, worker_error="timeout"), "Training", "Degraded"),
    (
        "not-mapped",
        obs(pod=RUNNING, pod_current=True, worker=replace(WORKER, connected=False)),
        "Starting",
        "Serving",
    ),
    ("training", obs(pod=RUNNING, pod_current=True, worker=WORKER), "Serving", "Training"),
    ("paused", obs(pod=RUNNING, pod_current=True, worker=replace(WORKER, paused=True)), "Training", "Paused"),
]


@pytest.mark.parametrize(("facts", "previous", "phase"), [p[1:] for p in PHASES], ids=[p[0] for p in PHASES])
def test_phase(facts: Observation, previous: str | None, phase: str) -> None:
    assert status.phase_of(facts, previous)[0] == phase


@pytest.mark.parametrize(("phase", "ready"), [("Training", "True"), ("Paused", "True"), ("Serving", "False")])
def test_ready_means_serving_with_the_weights_mapped(phase: str, ready: str) -> None:
    facts = next(p[1] for p in PHASES if p[3] == phase)
    assert conditions(status.compute_status({}, facts, NOW))["Ready"]["status"] == ready


CONNECTED = [
    ("no-pod", obs(), "False", "NoWorker"),
    (
        "unreachable",
        obs(pod=RUNNING, pod_current=True, worker_error="timeout: no reply"),
        "False",
        "Unreachable",
    ),
    (
        "not-mapped",
        obs(pod=RUNNING, pod_current=True, worker=replace(WORKER, connected=False)),
        "False",
        "WeightsNotMapped",
    ),
    ("connected", obs(pod=RUNNING, pod_current=True, worker=WORKER), "True", "Connected"),
]


@pytest.mark.parametrize(
    ("facts", "state", "reason"), [c[1:] for c in CONNECTED], ids=[c[0] for c in CONNECTED]
)
def test_worker_connected_condition(facts: Observation, state: str, reason: str) -> None:
    cond = conditions(status.compute_status({}, facts, NOW))["WorkerConnected"]
    assert (cond["status"], cond["reason"]) == (state, reason)


APPLIED = [
    ("invalid", obs(spec_error="bad"), {}, "False", "Invalid"),
    ("restarting", obs(restarting="the spec changed", pod=RUNNING), {}, "False", "Restarting"),
    ("old-pod", obs(pod=RUNNING, pod_current=False), {}, "False", "PodPending"),
    (
        "relay-failed",
        obs(pod=RUNNING, pod_current=True, worker=WORKER, relay_error="invalid: lr"),
        {},
        "False",
        "RelayFailed",
    ),
    (
        "pending",
        obs(pod=RUNNING, pod_current=True, worker=WORKER, config_pending=("lr",)),
        {},
        "False",
        "Relaying",
    ),
    (
        "unconfirmed",
        obs(pod=RUNNING, pod_current=True, worker_error="timeout"),
        {},
        "False",
        "WaitingForWorker",
    ),
    (
        "confirmed-before",
        obs(pod=RUNNING, pod_current=True, worker_error="timeout"),
        {"appliedSpecHash": "h1"},
        "True",
        "Applied",
    ),
    ("confirmed", obs(pod=RUNNING, pod_current=True, worker=WORKER), {}, "True", "Applied"),
]


@pytest.mark.parametrize(
    ("facts", "previous", "state", "reason"), [a[1:] for a in APPLIED], ids=[a[0] for a in APPLIED]
)
def test_spec_applied_only_when_the_worker_confirmed(
    facts: Observation, previous: dict[str, Any], state: str, reason: str
) -> None:
    result = status.compute_status(previous, facts, NOW)
    cond = conditions(result)["SpecApplied"]
    assert (cond["status"], cond["reason"]) == (state, reason)
    assert (result.get("appliedSpecHash") == "h1") == (state == "True")


def test_worker_figures_are_copied_when_reported() -> None:
    checkpoint = CheckpointInfo(step=10, path="/var/lib/hogwild/step-00000010", time=NOW)
    facts = obs(pod=RUNNING, pod_current=True, worker=replace(WORKER, last_checkpoint=checkpoint))
    result = status.compute_status({}, facts, NOW)
    assert (result["step"], result["tokensTrained"], result["loss"]) == (12, 3400, 1.25)
    assert result["lastCheckpoint"] == {"step": 10, "path": "/var/lib/hogwild/step-00000010", "time": NOW}
    assert conditions(result)["CheckpointSaved"]["status"] == "True"


def test_no_worker_reply_invents_no_figures() -> None:
    result = status.compute_status({}, obs(pod=RUNNING, pod_current=True, worker_error="timeout"), NOW)
    assert not {"step", "tokensTrained", "loss", "lastCheckpoint"} & set(result)
    assert conditions(result)["CheckpointSaved"]["reason"] == "NoCheckpoint"


def test_last_confirmed_figures_stay_while_the_worker_is_unreachable() -> None:
    before = status.compute_status({}, obs(pod=RUNNING, pod_current=True, worker=WORKER), NOW)
    after = status.compute_status(before, obs(pod=RUNNING, pod_current=True, worker_error="timeout"), LATER)
    assert after["step"] == 12
    assert conditions(after)["WorkerConnected"]["status"] == "False"


def test_failed_checkpoint_is_reported() -> None:
    facts = obs(pod=RUNNING, pod_current=True, worker=WORKER, checkpoint_error="timeout: no reply")
    cond = conditions(status.compute_status({}, facts, NOW))["CheckpointSaved"]
    assert (cond["status"], cond["reason"], cond["message"]) == (
        "False",
        "CheckpointFailed",
        "timeout: no reply",
    )


@pytest.mark.parametrize(
    ("second", "moved"),
    [(obs(pod=RUNNING, pod_current=True, worker=WORKER), False), (obs(), True)],
    ids=["same-status-keeps-time", "flip-takes-new-time"],
)
def test_last_transition_time(second: Observation, moved: bool) -> None:
    first = status.compute_status({}, obs(pod=RUNNING, pod_current=True, worker=WORKER), NOW)
    ready = conditions(status.compute_status(first, second, LATER))["Ready"]
    assert ready["lastTransitionTime"] == (LATER if moved else NOW)


def test_unchanged_facts_give_an_identical_status() -> None:
    facts = obs(pod=RUNNING, pod_current=True, worker=WORKER)
    first = status.compute_status({}, facts, NOW)
    assert status.compute_status(first, facts, LATER) == first


def test_status_records_generation_pod_and_endpoint() -> None:
    result = status.compute_status({}, obs(), NOW)
    assert result["observedGeneration"] == 3
    assert result["podName"] == "chat"
    assert result["endpoint"] == "http://chat.ml.svc:8000"
    assert {c["observedGeneration"] for c in result["conditions"]} == {3}


def pod(**status_fields: Any) -> dict[str, Any]:
    meta = {"name": "chat", "annotations": {"hogwild.dev/pod-hash": "abc"}}
    return {"metadata": meta, "status": status_fields}


POD_FACTS = [
    ("created", pod(phase="Pending"), {"scheduled": False, "vllm_ready": False}),
    (
        "unschedulable",
        pod(
            phase="Pending",
            conditions=[
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes have GPUs",
                }
            ],
        ),
        {"scheduled": False, "unschedulable_message": "0/3 nodes have GPUs"},
    ),
    (
        "sidecar-ready",
        pod(
            phase="Running",
            podIP="10.0.0.7",
            conditions=[{"type": "PodScheduled", "status": "True"}],
            initContainerStatuses=[
                {"name": "vllm", "ready": True, "restartCount": 1, "state": {"running": {}}}
            ],
            containerStatuses=[
                {"name": "trainer", "ready": True, "restartCount": 2, "state": {"running": {}}}
            ],
        ),
        {"scheduled": True, "vllm_ready": True, "trainer_running": True, "ip": "10.0.0.7", "restarts": 3},
    ),
    (
        "crash-loop",
        pod(
            phase="Running",
            containerStatuses=[
                {
                    "name": "trainer",
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                }
            ],
        ),
        {"stuck": "trainer: CrashLoopBackOff: back-off", "trainer_running": False},
    ),
]


@pytest.mark.parametrize(("raw", "expected"), [p[1:] for p in POD_FACTS], ids=[p[0] for p in POD_FACTS])
def test_pod_facts(raw: dict[str, Any], expected: dict[str, Any]) -> None:
    facts = status.pod_facts(raw, "hogwild.dev/pod-hash")
    assert {k: getattr(facts, k) for k in expected} == expected
    assert facts.pod_hash == "abc"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ({}, WorkerFacts()),
        ({"connected": "yes", "step": "12", "loss": True}, WorkerFacts()),
        (
            {
                "connected": True,
                "paused": True,
                "step": 3,
                "loss": 2,
                "last_checkpoint": {"step": 2, "path": "/c", "time": 0},
            },
            WorkerFacts(
                connected=True,
                paused=True,
                step=3,
                loss=2.0,
                last_checkpoint=CheckpointInfo(2, "/c", "1970-01-01T00:00:00Z"),
            ),
        ),
        ({"last_checkpoint": None, "config": "nope"}, WorkerFacts()),
    ],
    ids=["empty", "wrong-types-stay-unknown", "epoch-time-to-rfc3339", "null-checkpoint"],
)
def test_worker_facts(reply: dict[str, Any], expected: WorkerFacts) -> None:
    assert status.worker_facts(reply) == expected


@pytest.mark.parametrize(
    ("previous", "phase", "event"),
    [
        ("Serving", "Serving", None),
        (None, "Pending", ("Normal", "Pending")),
        ("Serving", "Training", ("Normal", "Training")),
        ("Training", "Degraded", ("Warning", "Degraded")),
        ("Pending", "Failed", ("Warning", "Failed")),
    ],
    ids=["unchanged", "new", "up", "degraded", "failed"],
)
def test_phase_event(previous: str | None, phase: str, event: tuple[str, str] | None) -> None:
    got = status.phase_event(previous, {"phase": phase, "message": "why"})
    assert (got[:2] if got else None) == event
    if got:
        assert got[2] == f"{previous or 'New'} -> {phase}: why"


# ---- a pod on its way out -----------------------------------------------------------------------------
WAITING = "waiting up to 300 s (until 2026-11-26T12:05:00Z) for the final checkpoint"
STOPPING = [
    ("restart", obs(restarting=f"the spec changed: {WAITING}", pod=RUNNING), "Restarting", WAITING),
    (
        "delete",
        obs(deleting=True, deleting_why=f"{WAITING}, then the pod goes", pod=RUNNING),
        "Terminating",
        WAITING,
    ),
    ("delete-no-wait", obs(deleting=True, pod=RUNNING), "Terminating", "the pod goes"),
]


@pytest.mark.parametrize(("facts", "phase", "says"), [s[1:] for s in STOPPING], ids=[s[0] for s in STOPPING])
def test_the_phase_names_what_the_pod_waits_for(facts: Observation, phase: str, says: str) -> None:
    result = status.compute_status({"phase": "Training"}, facts, NOW)
    assert (result["phase"], result["observedGeneration"]) == (phase, 3)
    assert says in result["message"]
    assert all(c["observedGeneration"] == 3 for c in result["conditions"])


KNOWN = [
    ("unreachable", obs(pod=RUNNING, pod_current=True, worker_error="timeout: no reply"), "Unreachable"),
    ("connected", obs(pod=RUNNING, pod_current=True, worker=WORKER), "Connected"),
]


@pytest.mark.parametrize(("before", "reason"), [k[1:] for k in KNOWN], ids=[k[0] for k in KNOWN])
@pytest.mark.parametrize(
    "leaving",
    [obs(restarting="the spec changed", pod=RUNNING), obs(deleting=True, pod=RUNNING)],
    ids=["restarting", "deleting"],
)
def test_a_worker_not_asked_while_its_pod_leaves_keeps_what_was_known(
    before: Observation, reason: str, leaving: Observation
) -> None:
    previous = status.compute_status({}, before, NOW)
    after = status.compute_status(previous, leaving, LATER)
    assert conditions(after)["WorkerConnected"]["reason"] == reason
    assert conditions(after)["WorkerConnected"]["lastTransitionTime"] == NOW


def test_condition_reasons_are_plain_strings_from_one_enum() -> None:
    """Reasons travel to the API as JSON and come back as str: the dict must hold the enum's value."""
    result = status.compute_status({}, obs(pod=RUNNING, pod_current=True, worker=WORKER), NOW)
    reasons = [c["reason"] for c in result["conditions"] if c["type"] != "Ready"]
    assert len(reasons) == 3 and all(type(r) is str for r in reasons)
    assert set(reasons) <= {r.value for r in status.Reason}
