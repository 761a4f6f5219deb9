"""A session's training workers, one per replica: asked for their status, sent the hot configure changes
they lack, the evaluation set, and (through replica 0 alone) spec.rollback, once per id.

Every replica's worker gets the changes: the worker group orders a configure that arrives at several
members, and a duplicate is harmless. Replica 0's answer is the session's (step, loss, phase); every
replica's answer goes into its status entry (hogwild.operator.replicas).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from hogwild.operator import builders, replicas, safety, status
from hogwild.operator.diff import config_changes
from hogwild.operator.final_checkpoint import EventSink
from hogwild.operator.kube import Kube
from hogwild.operator.options import OperatorOptions
from hogwild.operator.relay import Relay, Target
from hogwild.operator.replica_pods import Converged
from hogwild.operator.spec import SessionSpec
from hogwild.protocol import (
    ConfigureRequest,
    JoinRequest,
    ProtocolError,
    RollbackRequest,
    Sample,
    StatusReply,
    StatusRequest,
)

logger = logging.getLogger(__name__)
# (session body, session, pod, replica ordinal) -> where that replica's worker listens, or None.
TargetFn = Callable[[Mapping[str, Any], builders.SessionRef, status.PodFacts, int], Target | None]


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Workers:
    def __init__(
        self,
        options: OperatorOptions,
        kube: Kube,
        relay: Relay,
        emit: EventSink,
        target: TargetFn,
        keys_unsure: Callable[[str], None],
    ) -> None:
        self.options, self.kube, self.relay, self.emit = options, kube, relay, emit
        self.target, self.keys_unsure = target, keys_unsure
        # uid -> (the last spec.rollback id answered, its status record): a status write that was lost (a
        # conflicting patch) must not lose the record, and the rollback must not run twice.
        self._rolled_back: dict[str, tuple[str, dict[str, Any]]] = {}

    def forget(self, uid: str) -> None:
        self._rolled_back.pop(uid, None)

    async def observe(
        self,
        body: Mapping[str, Any],
        session: builders.SessionRef,
        spec: SessionSpec,
        converged: Converged,
    ) -> status.Observation:
        """Every current replica's worker, asked at once: replica 0's answer (or error) is the session's own
        (step, loss, phase, rollback); each gets the hot configure changes it lacks (the group orders them)."""
        obs = converged.obs
        ordinals = [i for i in converged.current if i != 0 or not obs.restarting]
        results = await asyncio.gather(
            *(self._observe_worker(body, session, spec, obs, i, converged.seen[i]) for i in ordinals)
        )
        by_ordinal = dict(zip(ordinals, results, strict=True))
        if 0 in by_ordinal:
            obs = by_ordinal[0][0]
        said = {i: reply for i, (_, reply) in by_ordinal.items() if reply is not None}
        seen = [
            replicas.Replica(
                i,
                pod,
                worker=by_ordinal[i][0].worker if i in by_ordinal else None,
                version=said[i].get("version") if i in said else None,
                group=replicas.group_of(said[i]) if i in said else None,
                message=converged.notes.get(i),
            )
            for i, pod in converged.seen.items()
        ]
        previous = (body.get("status") or {}).get("replicaStatuses")
        return replace(obs, replica_status=replicas.replica_status(spec.replicas, seen, previous))

    async def _observe_worker(
        self,
        body: Mapping[str, Any],
        session: builders.SessionRef,
        spec: SessionSpec,
        obs: status.Observation,
        replica: int,
        pod: status.PodFacts,
    ) -> tuple[status.Observation, StatusReply | None]:
        """`obs` with what replica `replica`'s worker said, and its status reply (None without one).
        Only replica 0's answer becomes the session's; spec.rollback goes through replica 0 alone."""
        target = self.target(body, session, pod, replica)
        if target is None:
            return obs, None
        timeout = self.options.status_timeout_s
        try:
            said = await self.relay.request(target, StatusRequest(), timeout)
        except ProtocolError as err:
            self.keys_unsure(session.uid)
            return replace(obs, worker_error=f"{err.code}: {err.message}"), None
        cannot_join: str | None = None
        if (
            spec.replicas > 1
            and pod.dns_name
            and (group := replicas.group_of(said))
            and group.state == "alone"
        ):
            said, cannot_join = await self._join(body, session, target, replica, said)
        facts = status.worker_facts(said)
        obs = replace(obs, safety=safety.safety_status(said), relay_error=cannot_join or obs.relay_error)
        if replica == 0:
            obs = await self._rollback(body, session, spec, target, obs)
        changes = config_changes(spec.training, facts.config)
        try:
            samples = await self._eval_samples(
                session, spec, force="gate" in changes, held=safety.worker_eval_digest(said)
            )
        except ValueError as err:
            return replace(obs, worker=facts, relay_error=f"evaluation set: {err}"), said
        if changes or samples is not None:
            try:
                request = ConfigureRequest(changes=changes, eval_samples=samples[0] if samples else None)
                reply = await self.relay.request(target, request, self.options.configure_timeout_s)
                said = await self.relay.request(target, StatusRequest(), timeout)
                facts = status.worker_facts(said)
            except ProtocolError as err:
                pending = tuple(sorted(changes))
                error = f"{err.code}: {err.message}"
                return replace(obs, worker=facts, config_pending=pending, relay_error=error), said
            reset = " (optimizer state reset)" if reply.get("state_reset") else ""
            applied = sorted(changes) + (["the evaluation set"] if samples is not None else [])
            who = f"replica {replica}'s worker" if spec.replicas > 1 or replica else "worker"
            self.emit(body, "Normal", "Configured", f"{who} applied {', '.join(applied)}{reset}")
            logger.info(
                "configure session=%s/%s replica=%d fields=%s%s",
                session.namespace,
                session.name,
                replica,
                ",".join(sorted(changes)),
                reset,
            )
        pending = tuple(sorted(config_changes(spec.training, facts.config)))
        return replace(obs, worker=facts, config_pending=pending), said

    async def _join(
        self,
        body: Mapping[str, Any],
        session: builders.SessionRef,
        target: Target,
        replica: int,
        said: StatusReply,
    ) -> tuple[StatusReply, str | None]:
        """A running replica built for one (its pod has the group's DNS name, not its env) joins the group in
        place when the session scales up: no restart; replica 0 then hosts the store the new replicas find
        by that name. Asked again on every reconcile until the worker says it is in the group. Returns the
        worker's status and, when the worker cannot join at all (an older worker image), why."""
        request = JoinRequest(
            replica=replica, rendezvous=builders.rendezvous(session), host_store=replica == 0
        )
        try:
            reply = await self.relay.request(target, request, self.options.configure_timeout_s)
            said = await self.relay.request(target, StatusRequest(), self.options.status_timeout_s)
        except ProtocolError as err:  # busy (a lone request runs), or away: the next reconcile asks again
            logger.info("join session=%s/%s replica=%d: %s", session.namespace, session.name, replica, err)
            if err.code in {"busy", "not_connected", "timeout"}:
                return said, None
            return (
                said,
                f"replica {replica}'s worker cannot join the replica group: {err.code}: {err.message}",
            )
        if reply.get("joined"):
            self.emit(
                body, "Normal", "JoinedGroup", f"replica {replica}'s worker joined the replica group in place"
            )
            logger.info("joined session=%s/%s replica=%d", session.namespace, session.name, replica)
        return said, None

    async def _eval_samples(
        self, session: builders.SessionRef, spec: SessionSpec, *, force: bool, held: str | None
    ) -> tuple[tuple[Sample, ...], str] | None:
        """The ConfigMap's evaluation set and its digest, when it must be relayed: the worker holds another
        (`held`, its digest), or the gate is relayed too."""
        ref = spec.eval_config_map
        if ref is None:
            return None
        found = await self.kube.get("ConfigMap", session.namespace, ref.name)
        samples, digest = safety.eval_samples_of(found, ref)
        return (samples, digest) if force or held != digest else None

    async def _rollback(
        self,
        body: Mapping[str, Any],
        session: builders.SessionRef,
        spec: SessionSpec,
        target: Target,
        obs: status.Observation,
    ) -> status.Observation:
        """spec.rollback, once per id: relayed, recorded in status.rollback, announced by an Event."""
        wanted = spec.rollback
        if wanted is None or not safety.rollback_due(wanted, body.get("status") or {}):
            return obs
        answered = self._rolled_back.get(session.uid)
        if answered is not None and answered[0] == wanted.id:  # not yet in status: write the record again
            return replace(obs, safety={**obs.safety, "rollback": answered[1]})
        try:
            reply = await self.relay.request(
                target, RollbackRequest(wanted.target(), wanted.id), self.options.configure_timeout_s
            )
        except ProtocolError as err:
            if not safety.rollback_is_final(err):  # busy or away: the next reconcile asks again
                return replace(obs, relay_error=f"rollback {wanted.id}: {err.code}: {err.message}")
            record = safety.rollback_record(wanted, None, f"{err.code}: {err.message}", now_iso())
            self.emit(
                body, "Warning", "RollbackFailed", f"rollback {wanted.id} to {wanted.to}: {record['message']}"
            )
        else:
            record = safety.rollback_record(wanted, reply, None, now_iso())
            self.emit(body, "Normal", "RolledBack", f"rollback {wanted.id}: {record['message']}")
            obs = replace(obs, safety={**obs.safety, "weightsVersion": record["version"]})
        self._rolled_back[session.uid] = (wanted.id, record)
        logger.info("rollback session=%s/%s id=%s %s", session.namespace, session.name, wanted.id, record)
        return replace(obs, safety={**obs.safety, "rollback": record})
