"""The session's replica pods, brought to the spec: find them, then create, remove or replace per
hogwild.operator.replicas.plan (pure). The Kubernetes calls and the final checkpoint's wait are here; every
decision is in `replicas`.

Pods are found by name, not listed: the operator's RBAC has no `list` on pods (least privilege), and the
emulator in tests has no label selectors. Ordinals below spec.replicas are read; above, the reading goes on
until the first missing ordinal and covers every ordinal the last status named (a scale down from 5 to 1
finds 4, 3, 2 and 1 even when a status write was lost).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from hogwild.operator import builders, diff, pod_builder, replicas, status
from hogwild.operator.final_checkpoint import EventSink, PodStopper
from hogwild.operator.kube import Kube
from hogwild.operator.options import OperatorOptions
from hogwild.operator.relay import Relay, Target
from hogwild.operator.spec import MAX_REPLICAS, SessionSpec

logger = logging.getLogger(__name__)
# Where replica `ordinal`'s worker listens, or None while it cannot be reached.
TargetOf = Callable[[int, status.PodFacts], Target | None]


@dataclass(frozen=True)
class Converged:
    obs: status.Observation  # replica 0's pod as the session's `pod`; `restarting` while any is replaced
    retry_s: float | None
    seen: dict[int, status.PodFacts]  # every replica pod found or created (ordinal -> its facts)
    current: tuple[int, ...]  # ordinals whose pod is built from this spec and not on its way out
    notes: dict[int, str]  # ordinal -> why it is not as the spec asks (for its status entry)


def _ours(pod: Mapping[str, Any], session: builders.SessionRef) -> bool:
    owners = pod.get("metadata", {}).get("ownerReferences") or []
    return any(o.get("uid") == session.uid and o.get("controller") for o in owners) or not session.uid


class ReplicaPods:
    def __init__(
        self, options: OperatorOptions, kube: Kube, relay: Relay, stopper: PodStopper, emit: EventSink
    ) -> None:
        self.options, self.kube, self.relay, self.stopper, self.emit = options, kube, relay, stopper, emit

    async def find(
        self, session: builders.SessionRef, wanted: int, previous: Mapping[str, Any]
    ) -> dict[int, dict[str, Any]]:
        """Replica pods by ordinal (see the module docstring for which ordinals are read)."""
        named = [e.get("replica") for e in previous.get("replicaStatuses") or [] if isinstance(e, Mapping)]
        known = {i for i in named if isinstance(i, int) and 0 <= i < MAX_REPLICAS}
        found: dict[int, dict[str, Any]] = {}
        ordinal = 0
        last_known = max(known, default=-1)
        while ordinal < MAX_REPLICAS and (ordinal < wanted or ordinal <= last_known or ordinal - 1 in found):
            pod = await self.kube.get("Pod", session.namespace, builders.pod_name(session, ordinal))
            if pod is not None:
                found[ordinal] = pod
            ordinal += 1
        return found

    async def converge(
        self,
        body: Mapping[str, Any],
        session: builders.SessionRef,
        spec: SessionSpec,
        base: status.Observation,
        target_of: TargetOf,
    ) -> Converged:
        raw_spec = body.get("spec") or {}
        want_hash = pod_builder.build_pod(session, spec)["metadata"]["annotations"][
            pod_builder.POD_HASH_ANNOTATION
        ]
        pods = await self.find(session, spec.replicas, body.get("status") or {})
        found = {
            i: replicas.Found(
                i,
                status.pod_facts(pod, pod_builder.POD_HASH_ANNOTATION),
                ours=_ours(pod, session),
                member=pod_builder.group_member(pod),
            )
            for i, pod in pods.items()
        }
        seen = {i: f.pod for i, f in found.items() if f.ours}
        todo = replicas.plan(spec.replicas, found, want_hash)
        for ordinal in todo.remove:  # highest first; the worker leaves its group on SIGTERM
            await self.kube.delete("Pod", session.namespace, found[ordinal].pod.name)
            await self.relay.forget(session.namespace, session.name, ordinal)
            self.emit(
                body, "Normal", "ScaledDown", f"removed replica {ordinal} (pod {found[ordinal].pod.name})"
            )
            logger.info("scale down session=%s/%s replica=%d", session.namespace, session.name, ordinal)
            seen[ordinal] = replace(found[ordinal].pod, terminating=True)
        restarting: str | None = None
        retry: float | None = None
        if todo.replace:
            first = found[todo.replace[0]]
            why = self._why(pods[first.ordinal], first, spec, todo.join)
            waiting = await self.stopper.replace(
                body, session, spec, first.pod, target_of(first.ordinal, first.pod), why
            )
            if waiting is not None:  # the status timer looks again
                restarting = waiting
            else:
                for ordinal in todo.replace[1:]:  # the group checkpointed through the first
                    await self.kube.delete("Pod", session.namespace, found[ordinal].pod.name)
                for ordinal in todo.replace:
                    again = await self.kube.get("Pod", session.namespace, found[ordinal].pod.name)
                    if again is None:
                        del seen[ordinal]
                        todo = replace(todo, create=tuple(sorted({*todo.create, ordinal})))
                    else:
                        seen[ordinal] = status.pod_facts(again, pod_builder.POD_HASH_ANNOTATION)
                        restarting, retry = why, self.options.restart_poll_s
        else:
            self.stopper.forget(session.uid)  # a restart asked for earlier is off: the spec went back
        for ordinal in todo.create:
            desired = pod_builder.record_built_from(pod_builder.build_pod(session, spec, ordinal), raw_spec)
            created, made = await self.kube.ensure(desired)
            seen[ordinal] = status.pod_facts(created, pod_builder.POD_HASH_ANNOTATION)
            if made and ordinal > 0:
                self.emit(
                    body, "Normal", "ScaledUp", f"added replica {ordinal} (pod {desired['metadata']['name']})"
                )
        notes = {i: f"pod {found[i].pod.name} exists and is not this session's; rename or delete it"
                 for i in todo.blocked}  # fmt: skip
        notes.update({i: f"waiting for pod {found[i].pod.name} to stop" for i in todo.waiting})
        if 0 in notes:
            restarting = restarting or notes[0]
        if notes:
            retry = retry or self.options.restart_poll_s
        current = tuple(
            i
            for i, pod in sorted(seen.items())
            if i < spec.replicas
            and pod.pod_hash == want_hash
            and not pod.terminating
            and (not todo.replace or i not in todo.replace)
        )
        pod0 = seen.get(0)
        obs = replace(base, pod=pod0, pod_current=0 in current, restarting=restarting)
        return Converged(obs, retry, seen, current, notes)

    def _why(self, pod: Mapping[str, Any], found: replicas.Found, spec: SessionSpec, join: bool) -> str:
        if join:
            return (
                f"pod {found.pod.name} was built for one replica; replacing it so that it joins the group of "
                f"{spec.replicas} (the others serve meanwhile)"
            )
        if found.pod.phase in {"Failed", "Succeeded"}:
            return f"pod {found.pod.name} ended ({found.pod.phase})"
        recorded = (pod.get("metadata", {}).get("annotations") or {}).get(pod_builder.BUILT_FROM_ANNOTATION)
        try:
            built_from = json.loads(recorded) if recorded else None
        except ValueError:
            built_from = None
        return diff.restart_reason(built_from, spec, self.options.image_defaults)
