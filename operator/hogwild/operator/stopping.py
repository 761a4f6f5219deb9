"""Before a session's pod goes (a restart-requiring change, or a delete): whether to wait for the worker's
final checkpoint, for how long, and what the status and the Events say about it.

Nothing is waited for that is known not to come: no pod, a pod already being deleted (its worker checkpoints
on SIGTERM, within the pod's grace period), a checkpoint volume being deleted (its namespace is going, most
likely: a checkpoint there would not outlive it), a pod or trainer that is not running, or a worker that the
last status check found unreachable or without weights. Otherwise the wait is bounded by the session's
`spec.checkpoint.timeoutSeconds` and by the operator's `--final-checkpoint-timeout`, whichever is shorter.
Pure: no I/O and no clock (deadlines come in as text).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hogwild.operator.status import PodFacts, Reason

# Event reasons.
WAITING = "Checkpointing"
SKIPPED = "CheckpointSkipped"


@dataclass(frozen=True)
class Plan:
    """Wait up to `wait_s` for the final checkpoint, or (`skip`) go at once, saying why."""

    wait_s: float = 0.0
    skip: str | None = None


@dataclass(frozen=True)
class Bound:
    wait_s: float
    spec_s: float  # what the session asked for
    operator_s: float  # the operator's ceiling

    @property
    def capped(self) -> bool:
        return self.operator_s < self.spec_s


def bound(spec_timeout_s: float, operator_limit_s: float) -> Bound:
    return Bound(max(0.0, min(spec_timeout_s, operator_limit_s)), spec_timeout_s, operator_limit_s)


def _worker_condition(status: Mapping[str, Any]) -> Mapping[str, Any]:
    found = (c for c in status.get("conditions") or [] if c.get("type") == "WorkerConnected")
    return next(found, {})


def plan(
    status: Mapping[str, Any],
    pod: PodFacts | None,
    *,
    worker_addressable: bool,
    pvc_terminating: str | None = None,
    wait: Bound,
) -> Plan:
    """`status`: the session's status as last written; `worker_addressable`: the operator knows where the
    worker listens and holds its keys; `pvc_terminating`: the name of the checkpoint PVC if it is being
    deleted."""
    if pod is None:
        return Plan(skip="there is no pod")
    if pod.terminating:
        return Plan(skip=f"pod {pod.name} is already being deleted (its worker checkpoints on SIGTERM)")
    if pvc_terminating:
        return Plan(skip=f"the checkpoint volume {pvc_terminating} is being deleted (is the namespace?)")
    if pod.phase != "Running":
        return Plan(skip=f"pod {pod.name} is not running ({pod.phase})")
    if not worker_addressable:
        return Plan(skip="the trainer container is not running")
    worker = _worker_condition(status)
    if worker.get("status") == "False" and worker.get("reason") == Reason.UNREACHABLE.value:
        return Plan(skip=f"the worker did not answer the last status check ({worker.get('message')})")
    if worker.get("status") == "False" and worker.get("reason") == Reason.WEIGHTS_NOT_MAPPED.value:
        return Plan(skip="the worker has no weights mapped")
    if wait.wait_s <= 0:
        return Plan(skip="final checkpoints are off (the operator's --final-checkpoint-timeout is 0)")
    return Plan(wait_s=wait.wait_s)


# ---- what the status and the Events say ---------------------------------------------------------------
def _limit(wait: Bound) -> str:
    if wait.capped:
        return f"; {wait.wait_s:g} s is the operator's --final-checkpoint-timeout (the spec asks {wait.spec_s:g} s)"
    return ""


def waiting_event(action: str, wait: Bound, until: str, why: str | None = None) -> str:
    """`action`: what follows the checkpoint ("replacing pod chat")."""
    because = f" ({why})" if why else ""
    return f"waiting up to {wait.wait_s:g} s, until {until}, for the final checkpoint before {action}{because}{_limit(wait)}"


def waiting_status(wait_s: float, until: str) -> str:
    return f"waiting up to {wait_s:g} s (until {until}) for the final checkpoint"


def lost(status: Mapping[str, Any]) -> str:
    last = status.get("lastCheckpoint") or {}
    if last.get("step") is not None:
        return f"steps trained since the last checkpoint (step {last['step']}) may be lost"
    return "everything trained so far may be lost (no checkpoint yet)"


def skipped_event(action: str, reason: str, status: Mapping[str, Any]) -> str:
    return f"no final checkpoint before {action}: {reason}; {lost(status)}"


def abandoned_event(action: str, reason: str, status: Mapping[str, Any]) -> str:
    return f"stopped waiting for the final checkpoint before {action}: {reason}; {lost(status)}"
