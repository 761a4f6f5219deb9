"""A TrainingSession's status (phase, conditions, training progress) from what was observed.

The status never claims what the worker has not confirmed: step, loss, tokens and the last checkpoint come
only from the worker's own status reply (the last confirmed values stay, with WorkerConnected saying whether
they are current), and SpecApplied turns True only once the worker reports the desired hyperparameters.
Pure: facts in, a status dict out; no I/O and no clock (the caller passes `now`).
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hogwild.protocol import StatusReply

PHASES = (
    "Pending",
    "Starting",
    "Serving",
    "Training",
    "Paused",
    "Restarting",
    "Degraded",
    "Failed",
    "Terminating",
)
CONDITIONS = ("Ready", "WorkerConnected", "SpecApplied", "CheckpointSaved")
# Container waiting reasons that will not fix themselves.
STUCK_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
WARNING_PHASES = frozenset({"Degraded", "Failed"})


class Reason(str, enum.Enum):
    """Why a condition (other than Ready, whose reason is the phase) has its status: one name per cause."""

    NO_WORKER = "NoWorker"
    UNREACHABLE = "Unreachable"
    WEIGHTS_NOT_MAPPED = "WeightsNotMapped"
    CONNECTED = "Connected"
    INVALID = "Invalid"
    WAITING = "Waiting"
    RESTARTING = "Restarting"
    POD_PENDING = "PodPending"
    RELAY_FAILED = "RelayFailed"
    APPLIED = "Applied"
    WAITING_FOR_WORKER = "WaitingForWorker"
    RELAYING = "Relaying"
    CHECKPOINT_FAILED = "CheckpointFailed"
    SAVED = "Saved"
    NO_CHECKPOINT = "NoCheckpoint"


@dataclass(frozen=True)
class PodFacts:
    name: str
    phase: str = "Pending"  # the pod's own phase
    uid: str = ""
    terminating: bool = False
    scheduled: bool = False
    unschedulable_message: str | None = None
    ip: str | None = None
    vllm_ready: bool = False
    trainer_running: bool = False
    stuck: str | None = None  # "<container>: <reason>: <message>" when a container cannot start
    restarts: int = 0
    pod_hash: str | None = None
    # It has a hostname under the session's headless Service: it can join a replica group in place.
    dns_name: bool = False


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: str
    time: str | None


@dataclass(frozen=True)
class WorkerFacts:
    """The worker's status reply, as it said it."""

    connected: bool = False
    paused: bool = False
    busy: bool = False
    step: int | None = None
    tokens_trained: int | None = None
    loss: float | None = None
    skipped_steps: int | None = None
    last_checkpoint: CheckpointInfo | None = None
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    generation: int
    spec_hash: str
    pod_name: str
    endpoint: str
    deleting: bool = False
    deleting_why: str | None = None  # what the delete waits for, when it waits
    spec_error: str | None = None
    waiting: str | None = None  # something the session needs does not exist yet
    restarting: str | None = None  # why the pod is being replaced
    pod: PodFacts | None = None
    pod_current: bool = False  # the pod was built from the current spec
    worker: WorkerFacts | None = None
    worker_error: str | None = None
    config_pending: tuple[str, ...] = ()  # hot fields the worker has not confirmed
    relay_error: str | None = None
    checkpoint_error: str | None = None
    # weightsVersion, lineage, gate, rollback: hogwild.operator.safety computes them; kept when not re-observed
    safety: Mapping[str, Any] = field(default_factory=dict)
    # replicas, readyReplicas, inSyncReplicas, replicaStatuses: hogwild.operator.replicas computes them
    replica_status: Mapping[str, Any] = field(default_factory=dict)


# ---- facts from API objects and replies ---------------------------------------------------------------
def _container_states(statuses: list[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {s.get("name", ""): s for s in statuses or []}


def pod_facts(pod: Mapping[str, Any], hash_annotation: str) -> PodFacts:
    meta = pod.get("metadata", {})
    status = pod.get("status", {}) or {}
    spec = pod.get("spec") or {}
    conditions = {c.get("type"): c for c in status.get("conditions", []) or []}
    scheduled = conditions.get("PodScheduled", {})
    states = {
        **_container_states(status.get("initContainerStatuses", [])),
        **_container_states(status.get("containerStatuses", [])),
    }
    stuck = None
    for name, state in states.items():
        waiting = (state.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            stuck = f"{name}: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
            break
    unschedulable = scheduled.get("message") if scheduled.get("reason") == "Unschedulable" else None
    return PodFacts(
        name=meta.get("name", ""),
        phase=status.get("phase", "Pending"),
        uid=meta.get("uid", ""),
        terminating=bool(meta.get("deletionTimestamp")),
        scheduled=scheduled.get("status") == "True" or bool(status.get("podIP")),
        unschedulable_message=unschedulable,
        ip=status.get("podIP") or None,
        vllm_ready=bool(states.get("vllm", {}).get("ready")),
        trainer_running="running" in (states.get("trainer", {}).get("state") or {}),
        stuck=stuck,
        restarts=sum(int(s.get("restartCount", 0)) for s in states.values()),
        pod_hash=(meta.get("annotations") or {}).get(hash_annotation),
        dns_name=bool(spec.get("hostname") and spec.get("subdomain")),
    )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def iso_time(value: Any) -> str | None:
    """RFC 3339 (what the CRD's date-time wants) from an epoch number or a string; None when neither."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.datetime.fromtimestamp(float(value), datetime.UTC)
        return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    return value if isinstance(value, str) and value else None


def worker_facts(reply: StatusReply) -> WorkerFacts:
    """Tolerant: a field the worker left out stays unknown (None), never invented."""
    loss = reply.get("loss")
    checkpoint = reply.get("last_checkpoint")
    info = None
    if isinstance(checkpoint, Mapping) and _int_or_none(checkpoint.get("step")) is not None:
        info = CheckpointInfo(
            step=int(checkpoint["step"]),
            path=str(checkpoint.get("path", "")),
            time=iso_time(checkpoint.get("time")),
        )
    config = reply.get("config")
    return WorkerFacts(
        connected=reply.get("connected") is True,
        paused=reply.get("paused") is True,
        busy=reply.get("busy") is True,
        step=_int_or_none(reply.get("step")),
        tokens_trained=_int_or_none(reply.get("tokens_trained")),
        loss=float(loss) if isinstance(loss, int | float) and not isinstance(loss, bool) else None,
        skipped_steps=_int_or_none(reply.get("skipped_steps")),
        last_checkpoint=info,
        config=dict(config) if isinstance(config, Mapping) else {},
    )


# ---- phase and conditions -----------------------------------------------------------------------------
def phase_of(obs: Observation, previous_phase: str | None) -> tuple[str, str]:
    """(phase, message)."""
    was_up = previous_phase in {"Serving", "Training", "Paused", "Degraded"}
    pod, worker = obs.pod, obs.worker
    if obs.deleting:
        return "Terminating", obs.deleting_why or "the pod goes"
    if obs.spec_error:
        return "Failed", obs.spec_error
    if obs.waiting:
        return "Pending", obs.waiting
    if obs.restarting:
        return "Restarting", obs.restarting
    if pod is None:
        return "Pending", "creating the pod"
    if pod.phase in {"Failed", "Succeeded"}:
        return "Restarting", f"pod {pod.name} ended ({pod.phase}); replacing it"
    if pod.stuck:
        return "Degraded", pod.stuck
    if not pod.scheduled:
        return "Pending", pod.unschedulable_message or "waiting for the pod to be scheduled"
    if not pod.vllm_ready:
        if was_up:
            return "Degraded", "vLLM stopped answering its health check"
        return "Starting", "vLLM is loading the model"
    if worker is None:
        if previous_phase in {"Training", "Paused"}:
            return "Degraded", f"the training worker stopped answering: {obs.worker_error or 'no reply'}"
        return "Serving", "vLLM is serving; waiting for the training worker"
    if not worker.connected:
        return "Serving", "vLLM is serving; the training worker has not mapped its weights yet"
    if worker.paused:
        return "Paused", "training is paused; vLLM keeps serving"
    return "Training", "serving and training"


def _condition(kind: str, ok: bool | None, reason: Reason | str, message: str) -> dict[str, Any]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    # The plain string: the dict goes to the API as JSON and is compared with what comes back.
    return {
        "type": kind,
        "status": status,
        "reason": str(getattr(reason, "value", reason)),
        "message": message,
    }


def _worker_connected(obs: Observation, previous: Mapping[str, Any]) -> dict[str, Any]:
    if obs.pod is None or not obs.pod.trainer_running:
        return _condition("WorkerConnected", False, Reason.NO_WORKER, "the trainer container is not running")
    not_asked = obs.worker is None and obs.worker_error is None and (obs.restarting or obs.deleting)
    prior = next((c for c in previous.get("conditions") or [] if c.get("type") == "WorkerConnected"), None)
    if not_asked and prior is not None:  # a pod on its way out is not asked: what was last known stands
        return {k: prior[k] for k in ("type", "status", "reason", "message") if k in prior}
    if obs.worker is None:
        return _condition(
            "WorkerConnected", False, Reason.UNREACHABLE, obs.worker_error or "no reply from the worker"
        )
    if not obs.worker.connected:
        return _condition(
            "WorkerConnected",
            False,
            Reason.WEIGHTS_NOT_MAPPED,
            "the worker answers but has no weights mapped",
        )
    return _condition("WorkerConnected", True, Reason.CONNECTED, "the worker has mapped vLLM's weights")


def _spec_applied(obs: Observation, previous: Mapping[str, Any]) -> dict[str, Any]:
    if obs.spec_error:
        return _condition("SpecApplied", False, Reason.INVALID, obs.spec_error)
    if obs.waiting:
        return _condition("SpecApplied", False, Reason.WAITING, obs.waiting)
    if obs.restarting:
        return _condition("SpecApplied", False, Reason.RESTARTING, obs.restarting)
    if obs.pod is None or not obs.pod_current:
        return _condition(
            "SpecApplied", False, Reason.POD_PENDING, "the pod for this spec is not running yet"
        )
    if obs.relay_error:
        return _condition("SpecApplied", False, Reason.RELAY_FAILED, obs.relay_error)
    if obs.worker is None:
        if previous.get("appliedSpecHash") == obs.spec_hash:
            return _condition("SpecApplied", True, Reason.APPLIED, "the worker confirmed this spec")
        return _condition(
            "SpecApplied", False, Reason.WAITING_FOR_WORKER, "the worker has not confirmed this spec yet"
        )
    if obs.config_pending:
        pending = ", ".join(obs.config_pending)
        return _condition(
            "SpecApplied", False, Reason.RELAYING, f"waiting for the worker to confirm {pending}"
        )
    return _condition("SpecApplied", True, Reason.APPLIED, "the worker confirmed this spec")


def _checkpoint_json(info: CheckpointInfo) -> dict[str, Any]:
    return {"step": info.step, "path": info.path, "time": info.time}


def _checkpoint_saved(obs: Observation, last: Mapping[str, Any] | None) -> dict[str, Any]:
    if obs.checkpoint_error:
        return _condition("CheckpointSaved", False, Reason.CHECKPOINT_FAILED, obs.checkpoint_error)
    if last:
        where = f"step {last.get('step')} at {last.get('path')}"
        return _condition("CheckpointSaved", True, Reason.SAVED, where)
    return _condition("CheckpointSaved", False, Reason.NO_CHECKPOINT, "no checkpoint written yet")


def _merge_times(
    new: list[dict[str, Any]], old: list[Mapping[str, Any]], now: str, generation: int
) -> list[dict[str, Any]]:
    """Keep lastTransitionTime while a condition's status stays the same."""
    before = {c.get("type"): c for c in old or []}
    for cond in new:
        prior = before.get(cond["type"])
        same = prior is not None and prior.get("status") == cond["status"]
        cond["lastTransitionTime"] = prior.get("lastTransitionTime", now) if same and prior else now
        cond["observedGeneration"] = generation
    return new


SAFETY_KEYS = ("weightsVersion", "lineage", "gate", "rollback")
REPLICA_KEYS = ("replicas", "readyReplicas", "inSyncReplicas", "replicaStatuses")


def compute_status(previous: Mapping[str, Any] | None, obs: Observation, now: str) -> dict[str, Any]:
    """The whole new status. Fields the worker did not (re)confirm keep their last confirmed values."""
    prev = dict(previous or {})
    phase, message = phase_of(obs, prev.get("phase"))
    status: dict[str, Any] = {
        "phase": phase,
        "message": message,
        "observedGeneration": obs.generation,
        "podName": obs.pod_name,
        "endpoint": obs.endpoint,
    }
    for key in (
        *("step", "tokensTrained", "loss", "skippedSteps", "lastCheckpoint", "appliedSpecHash"),
        *SAFETY_KEYS,
        *REPLICA_KEYS,
    ):
        if prev.get(key) is not None:
            status[key] = prev[key]
    status.update(obs.safety)
    status.update(obs.replica_status)
    worker = obs.worker
    if worker is not None:
        facts = {
            "step": worker.step,
            "tokensTrained": worker.tokens_trained,
            "loss": worker.loss,
            "skippedSteps": worker.skipped_steps,
        }
        status.update({k: v for k, v in facts.items() if v is not None})
        if worker.last_checkpoint is not None:
            status["lastCheckpoint"] = _checkpoint_json(worker.last_checkpoint)
    applied = _spec_applied(obs, prev)
    if applied["status"] == "True":
        status["appliedSpecHash"] = obs.spec_hash
    conditions = [
        _condition("Ready", phase in {"Training", "Paused"}, phase, message),
        _worker_connected(obs, prev),
        applied,
        _checkpoint_saved(obs, status.get("lastCheckpoint")),
    ]
    status["conditions"] = _merge_times(conditions, prev.get("conditions", []), now, obs.generation)
    return status


def phase_event(previous_phase: str | None, status: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(type, reason, message) for an Event when the phase changed, else None."""
    phase = status.get("phase")
    if not phase or phase == previous_phase:
        return None
    kind = "Warning" if phase in WARNING_PHASES else "Normal"
    return kind, phase, f"{previous_phase or 'New'} -> {phase}: {status.get('message', '')}"
