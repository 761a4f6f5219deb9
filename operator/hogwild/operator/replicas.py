"""spec.replicas, the pure part: which replica pods to create, remove or replace, and what the status says
about each replica (docs/replicas-operator.md).

Replica i's pod is `builders.pod_name(session, i)`. Scaling is hot: a pod whose ordinal stays is never
touched by a change of spec.replicas (pod_builder keeps the replica count out of the pod hash). Removal goes
highest ordinal first; a removed replica's worker leaves the group on SIGTERM by itself. A restart-requiring
change replaces every replica, the checkpoint asked of one (the group writes it once).

A pod built for a one-replica session has no group env (a running pod's env cannot change), but it has its
DNS name under the headless Service: on a scale-up from one, its worker is told to join the group in place
(hogwild.operator.workers), and it hosts the store the new replicas find by that name. One exception to
"never touched": a pod built before pods had that name (an older operator) cannot be reached by the others,
so it is replaced, with its checkpoint first, but only once another replica serves: the session never stops
answering for it. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hogwild.operator.status import PodFacts, WorkerFacts
from hogwild.protocol import StatusReply


@dataclass(frozen=True)
class Found:
    """Replica `ordinal`'s pod as found."""

    ordinal: int
    pod: PodFacts
    ours: bool = True  # owned by this session (a pod of that name could be another session's)
    member: bool = False  # built as a member of a replica group (pod_builder.group_member)


@dataclass(frozen=True)
class Plan:
    create: tuple[int, ...] = ()
    remove: tuple[int, ...] = ()  # ordinals >= replicas, highest first
    # Ordinals to replace; the first is asked for the final checkpoint, the rest go once it is done.
    replace: tuple[int, ...] = ()
    join: bool = False  # the replacement is a one-replica pod joining the group (not a spec change)
    waiting: tuple[int, ...] = ()  # pods still terminating: created again once they are gone
    blocked: tuple[int, ...] = ()  # names held by a pod that is not this session's: left alone


def plan(replicas: int, found: Mapping[int, Found], want_hash: str) -> Plan:
    remove = tuple(sorted((i for i, f in found.items() if i >= replicas and f.ours and not f.pod.terminating),
                          reverse=True))  # fmt: skip
    create: list[int] = []
    outdated: list[int] = []
    joining: list[int] = []
    waiting: list[int] = []
    blocked: list[int] = []
    for i in range(replicas):
        f = found.get(i)
        if f is None:
            create.append(i)
        elif not f.ours:
            blocked.append(i)
        elif f.pod.terminating:
            waiting.append(i)
        elif f.pod.phase in {"Failed", "Succeeded"} or f.pod.pod_hash != want_hash:
            outdated.append(i)
        elif replicas > 1 and not f.member and not f.pod.dns_name:
            joining.append(i)  # built for one replica before pods had a DNS name: only a new pod can join
    if outdated:
        # Ask a replica that can answer for the checkpoint: a running trainer, replica 0 when it can.
        answering = [i for i in outdated if found[i].pod.phase == "Running" and found[i].pod.trainer_running]
        first = answering[0] if answering else outdated[0]
        replace = (first, *(i for i in outdated if i != first))
        return Plan(tuple(create), remove, replace, False, tuple(waiting), tuple(blocked))
    serving = [
        i for i, f in found.items() if i < replicas and f.ours and not f.pod.terminating and f.pod.vllm_ready
    ]
    join = next((i for i in joining if any(j != i for j in serving)), None)
    replace = () if join is None else (join,)
    return Plan(tuple(create), remove, replace, join is not None, tuple(waiting), tuple(blocked))


# ---- the status ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """The `group` object of a worker's status reply, read defensively (absent on older workers)."""

    state: str | None = None  # alone, forming, formed
    rank: int | None = None
    size: int | None = None
    epoch: int | None = None
    members: tuple[int, ...] = ()
    in_sync: bool | None = None
    digest: str | None = None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def group_of(reply: StatusReply) -> Group | None:
    group = reply.get("group")
    if not isinstance(group, Mapping):
        return None
    members = group.get("members")
    return Group(
        state=group["state"] if isinstance(group.get("state"), str) else None,
        rank=_int(group.get("rank")),
        size=_int(group.get("size")),
        epoch=_int(group.get("epoch")),
        members=tuple(m for m in members if _int(m) is not None) if isinstance(members, list) else (),
        in_sync=group["in_sync"] if isinstance(group.get("in_sync"), bool) else None,
        digest=group["digest"] if isinstance(group.get("digest"), str) else None,
    )


@dataclass(frozen=True)
class Replica:
    """What one reconcile saw of one replica."""

    ordinal: int
    pod: PodFacts | None = None
    worker: WorkerFacts | None = None  # None: not asked, or no answer
    version: str | None = None  # the served weights' version, as the worker said it
    group: Group | None = None
    message: str | None = None  # why this replica is not what the spec asks, when the operator knows


def _in_sync(replica: Replica, replicas: int) -> bool | None:
    """True when this replica's weights equal the group's, as its worker last said; a lone replica's always
    do once its worker has weights, and a lone one among several never does. None: unknown."""
    worker, group = replica.worker, replica.group
    if worker is None:
        return None
    if group is None or group.state == "alone":
        if replicas == 1:
            return worker.connected
        return None if group is None else False
    if group.state == "forming":  # a joining replica's weights are not confirmed until the group has formed
        return False
    return group.in_sync


def _entry(replica: Replica, replicas: int, previous: Mapping[str, Any]) -> dict[str, Any]:
    pod = replica.pod
    entry: dict[str, Any] = {
        "replica": replica.ordinal,
        "pod": pod.name if pod else previous.get("pod", ""),
        "podPhase": ("Terminating" if pod.terminating else pod.phase) if pod else "Missing",
        "ready": bool(pod and pod.vllm_ready and not pod.terminating),
    }
    # What the worker last said stays until it says otherwise (as the top-level fields do).
    for key in ("step", "weightsVersion", "inSync", "groupState", "rank", "groupSize", "groupEpoch"):
        if previous.get(key) is not None:
            entry[key] = previous[key]
    if replica.worker is not None:
        group = replica.group
        said = {
            "step": replica.worker.step,
            "weightsVersion": replica.version,
            "inSync": _in_sync(replica, replicas),
            "groupState": group.state if group else None,
            "rank": group.rank if group else None,
            "groupSize": group.size if group else None,
            "groupEpoch": group.epoch if group else None,
        }
        entry.update({k: v for k, v in said.items() if v is not None})
    if pod is None:  # nothing of a missing pod is current
        entry.pop("inSync", None)
    if replica.message:
        entry["message"] = replica.message
    return entry


def replica_status(
    replicas: int, seen: Sequence[Replica], previous: Sequence[Mapping[str, Any]] | None
) -> dict[str, Any]:
    """status.replicas (pods that exist), readyReplicas, inSyncReplicas and one entry per replica."""
    before = {p.get("replica"): p for p in previous or [] if isinstance(p, Mapping)}
    entries = [_entry(r, replicas, before.get(r.ordinal, {})) for r in sorted(seen, key=lambda r: r.ordinal)]
    present = [e for e in entries if e["podPhase"] not in {"Missing", "Terminating"}]
    return {
        "replicas": len(present),
        "readyReplicas": sum(1 for e in present if e["ready"]),
        "inSyncReplicas": sum(1 for e in present if e["ready"] and e.get("inSync") is True),
        "replicaStatuses": entries,
    }
