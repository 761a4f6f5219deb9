"""One reconcile per TrainingSession: observe, build the desired children (pure), apply, relay, then compute
the status (pure). Create, resume, update and the status timer all run the same reconcile, under a
per-session lock, so it is idempotent: a second run, or a restarted operator, finds what the first made.

Side effects go through `kube` (API) and `relay` (worker); decisions come from spec/builders/pod_builder/diff/status.
The status is written through kopf's `patch` (kopf sends it to the status subresource after the handler),
except on delete, whose Terminating goes straight to the status before the final checkpoint's wait. What
happens before a pod goes (the final checkpoint, bounded, skipped when it cannot come) is in final_checkpoint.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import Any

from hogwild import auth, defaults
from hogwild.operator import builders, diff, pod_builder, safety, status
from hogwild.operator.diff import config_changes
from hogwild.operator.final_checkpoint import EventSink, PodStopper
from hogwild.operator.kube import APIError, Kube
from hogwild.operator.metrics import OperatorMetrics
from hogwild.operator.options import OperatorOptions
from hogwild.operator.relay import Relay, Target, client_keys
from hogwild.operator.spec import SessionSpec, SpecError, parse_spec
from hogwild.protocol import ConfigureRequest, ProtocolError, RollbackRequest, Sample, StatusRequest

logger = logging.getLogger(__name__)
# Children other than the pod are re-checked at most this often (and whenever the spec changes).
CHILDREN_RECHECK_S = 300.0


@dataclass(frozen=True)
class Outcome:
    phase: str
    retry_after_s: float | None = None  # ask kopf to run the handler again (waiting for the old pod)
    message: str = ""


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def session_of(body: Mapping[str, Any]) -> builders.SessionRef:
    meta = body["metadata"]
    return builders.SessionRef(name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid", ""))


class Controller:
    def __init__(
        self, options: OperatorOptions, kube: Kube, relay: Relay, metrics: OperatorMetrics, emit: EventSink
    ) -> None:
        self.options, self.kube, self.relay, self.metrics, self.emit = options, kube, relay, metrics, emit
        self._locks: dict[str, asyncio.Lock] = {}
        self._children_ok: dict[str, tuple[str, float]] = {}  # uid -> (spec hash, monotonic deadline)
        self._keys: dict[str, auth.CurveKeys] = {}  # uid -> the operator's CURVE keys for that session
        # uid -> (the last spec.rollback id answered, its status record): a status write that was lost (a
        # conflicting patch) must not lose the record, and the rollback must not run twice.
        self._rolled_back: dict[str, tuple[str, dict[str, Any]]] = {}
        self.stopper = PodStopper(options, kube, relay, emit)

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    # ---- the reconcile --------------------------------------------------------------------------------
    async def reconcile(
        self, body: Mapping[str, Any], trigger: str, patch: MutableMapping[str, Any]
    ) -> Outcome:
        session = session_of(body)
        if body["metadata"].get("deletionTimestamp"):
            return Outcome("Terminating")
        started = time.perf_counter()
        self.metrics.reconciles.labels(session.namespace, session.name, trigger).inc()
        try:
            async with self._lock(session.uid):
                return await self._reconcile(body, session, patch)
        except Exception as err:
            self.metrics.reconcile_errors.labels(session.namespace, session.name, type(err).__name__).inc()
            logger.warning(
                "reconcile session=%s/%s trigger=%s error=%r", session.namespace, session.name, trigger, err
            )
            raise
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.reconcile_seconds.labels(session.namespace, session.name).observe(elapsed)

    async def _reconcile(
        self, body: Mapping[str, Any], session: builders.SessionRef, patch: MutableMapping[str, Any]
    ) -> Outcome:
        previous = dict(body.get("status") or {})
        raw_spec = body.get("spec") or {}
        base = status.Observation(
            generation=int(body["metadata"].get("generation") or 1),
            spec_hash=builders.spec_hash(raw_spec),
            pod_name=session.name,
            endpoint=builders.endpoint(session),
        )
        try:
            spec = parse_spec(raw_spec, self.options.image_defaults)
        except SpecError as err:
            return self._write(body, session, previous, replace(base, spec_error=str(err)), patch)
        try:
            await self._ensure_children(session, spec, base.spec_hash)
        except _Waiting as wait:
            outcome = self._write(body, session, previous, replace(base, waiting=str(wait)), patch)
            return replace(outcome, retry_after_s=self.options.status_interval_s)
        obs, retry = await self._converge_pod(body, session, spec, base)
        if obs.pod is not None and obs.pod_current and not obs.restarting:
            obs = await self._observe_worker(body, session, spec, obs)
        outcome = self._write(body, session, previous, obs, patch)
        return replace(outcome, retry_after_s=retry)

    def _write(
        self,
        body: Mapping[str, Any],
        session: builders.SessionRef,
        previous: dict[str, Any],
        obs: status.Observation,
        patch: MutableMapping[str, Any],
    ) -> Outcome:
        new = status.compute_status(previous, obs, now_iso())
        if new != previous:
            patch.setdefault("status", {}).update(new)
        event = status.phase_event(previous.get("phase"), new)
        if event is not None:
            kind, reason, message = event
            self.emit(body, kind, reason, message)
            logger.info("phase session=%s/%s %s", session.namespace, session.name, message)
        for kind, reason, message in safety.safety_events(previous, new):
            self.emit(body, kind, reason, message)
        self.metrics.set_phase(session.namespace, session.name, new["phase"])
        return Outcome(new["phase"], message=new["message"])

    # ---- children -------------------------------------------------------------------------------------
    async def _ensure_children(self, session: builders.SessionRef, spec: SessionSpec, spec_hash: str) -> None:
        checked = self._children_ok.get(session.uid)
        if checked and checked[0] == spec_hash and checked[1] > time.monotonic():
            return
        names = builders.names(session, spec)
        self._keys[session.uid] = await self._ensure_credentials(session, spec, names)
        config, _ = await self.kube.ensure(builders.build_config_map(session, spec))
        desired = builders.build_config_map(session, spec)["data"]
        if (config.get("data") or {}) != desired:
            await self.kube.merge_patch("ConfigMap", session.namespace, names.config, {"data": desired})
        pvc = builders.build_pvc(session, spec)
        if pvc is not None:
            await self.kube.ensure(pvc)
        elif await self.kube.get("PersistentVolumeClaim", session.namespace, names.pvc) is None:
            raise _Waiting(
                f"waiting for PersistentVolumeClaim {names.pvc} (checkpoint.storage.existingClaim)"
            )
        await self.kube.ensure(builders.build_service(session, spec))
        self._children_ok[session.uid] = (spec_hash, time.monotonic() + CHILDREN_RECHECK_S)

    async def _ensure_credentials(
        self, session: builders.SessionRef, spec: SessionSpec, names: builders.Names
    ) -> auth.CurveKeys:
        ns = session.namespace
        if spec.auth.token_secret is None:
            await self.kube.ensure(builders.build_token_secret(session, spec, auth.generate_token()))
        elif await self.kube.get("Secret", ns, names.token_secret) is None:
            raise _Waiting(f"waiting for Secret {names.token_secret} (auth.tokenSecretRef)")
        if spec.auth.curve_secret is None:
            keys = _new_curve_keys()
            secret, _ = await self.kube.ensure(builders.build_curve_secret(session, spec, keys))
        else:
            found = await self.kube.get("Secret", ns, names.curve_secret)
            if found is None:
                raise _Waiting(f"waiting for Secret {names.curve_secret} (auth.curveSecretRef)")
            secret = found
        try:
            return client_keys(secret)
        except ValueError as err:
            raise _Waiting(str(err)) from None

    # ---- the pod --------------------------------------------------------------------------------------
    async def _converge_pod(
        self,
        body: Mapping[str, Any],
        session: builders.SessionRef,
        spec: SessionSpec,
        base: status.Observation,
    ) -> tuple[status.Observation, float | None]:
        """Bring the pod to this spec (create it, or checkpoint and replace an outdated one) and observe it;
        the observation, and when to look again (None: the status timer's usual interval)."""
        desired = pod_builder.record_built_from(pod_builder.build_pod(session, spec), body.get("spec") or {})
        want_hash = desired["metadata"]["annotations"][pod_builder.POD_HASH_ANNOTATION]
        found = await self.kube.get("Pod", session.namespace, session.name)
        if found is not None:
            facts = status.pod_facts(found, pod_builder.POD_HASH_ANNOTATION)
            if facts.terminating:
                obs = replace(base, pod=facts, restarting=f"waiting for pod {facts.name} to stop")
                return obs, self.options.restart_poll_s
            ended = facts.phase in {"Failed", "Succeeded"}
            if facts.pod_hash == want_hash and not ended:
                self.stopper.forget(session.uid)  # a restart asked for earlier is off: the spec went back
                return replace(base, pod=facts, pod_current=True), None
            why = f"pod {facts.name} ended ({facts.phase})" if ended else self._restart_reason(found, spec)
            target = self._target(body, session, facts)
            waiting = await self.stopper.replace(body, session, spec, facts, target, why)
            if waiting is not None:  # the status timer looks again; a retry here would log an error each time
                return replace(base, pod=facts, restarting=waiting), None
            found = await self.kube.get("Pod", session.namespace, session.name)
            if found is not None:  # still terminating: a later reconcile creates the new pod
                obs = replace(
                    base, pod=status.pod_facts(found, pod_builder.POD_HASH_ANNOTATION), restarting=why
                )
                return obs, self.options.restart_poll_s
        created, _ = await self.kube.ensure(desired)
        facts = status.pod_facts(created, pod_builder.POD_HASH_ANNOTATION)
        return replace(base, pod=facts, pod_current=facts.pod_hash == want_hash), None

    def _restart_reason(self, pod: Mapping[str, Any], spec: SessionSpec) -> str:
        recorded = (pod.get("metadata", {}).get("annotations") or {}).get(pod_builder.BUILT_FROM_ANNOTATION)
        try:
            built_from = json.loads(recorded) if recorded else None
        except ValueError:
            built_from = None
        return diff.restart_reason(built_from, spec, self.options.image_defaults)

    # ---- the worker -----------------------------------------------------------------------------------
    def _target(
        self, body: Mapping[str, Any], session: builders.SessionRef, pod: status.PodFacts
    ) -> Target | None:
        """Where the worker listens, or None while it cannot (trainer not running, keys not read yet).

        With the address override (tests, debugging) the pod's state is not consulted: the worker is elsewhere.
        """
        keys = self._keys.get(session.uid)
        annotations = body["metadata"].get("annotations") or {}
        override = (
            annotations.get(builders.WORKER_ADDRESS_ANNOTATION)
            if self.options.allow_address_override
            else None
        )
        if keys is None:
            return None
        if override:
            return Target(session.namespace, session.name, override, keys)
        if pod.trainer_running and pod.ip:
            return Target(session.namespace, session.name, builders.worker_address(pod.ip), keys)
        return None

    async def _observe_worker(
        self,
        body: Mapping[str, Any],
        session: builders.SessionRef,
        spec: SessionSpec,
        obs: status.Observation,
    ) -> status.Observation:
        assert obs.pod is not None
        target = self._target(body, session, obs.pod)
        if target is None:
            return obs
        timeout = self.options.status_timeout_s
        try:
            reply = await self.relay.request(target, StatusRequest(), timeout)
        except ProtocolError as err:
            self._children_ok.pop(session.uid, None)  # re-read the keys next time, in case they changed
            return replace(obs, worker_error=f"{err.code}: {err.message}")
        facts = status.worker_facts(reply)
        obs = replace(obs, safety=safety.safety_status(reply))
        obs = await self._rollback(body, session, spec, target, obs)
        changes = config_changes(spec.training, facts.config)
        try:
            samples = await self._eval_samples(
                session, spec, force="gate" in changes, held=safety.worker_eval_digest(reply)
            )
        except ValueError as err:
            return replace(obs, worker=facts, relay_error=f"evaluation set: {err}")
        if changes or samples is not None:
            try:
                request = ConfigureRequest(changes=changes, eval_samples=samples[0] if samples else None)
                reply = await self.relay.request(target, request, self.options.configure_timeout_s)
                facts = status.worker_facts(await self.relay.request(target, StatusRequest(), timeout))
            except ProtocolError as err:
                pending = tuple(sorted(changes))
                return replace(
                    obs, worker=facts, config_pending=pending, relay_error=f"{err.code}: {err.message}"
                )
            reset = " (optimizer state reset)" if reply.get("state_reset") else ""
            applied = sorted(changes) + (["the evaluation set"] if samples is not None else [])
            self.emit(body, "Normal", "Configured", f"worker applied {', '.join(applied)}{reset}")
            logger.info(
                "configure session=%s/%s fields=%s%s",
                session.namespace,
                session.name,
                ",".join(sorted(changes)),
                reset,
            )
        pending = tuple(sorted(config_changes(spec.training, facts.config)))
        return replace(obs, worker=facts, config_pending=pending)

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

    # ---- delete ---------------------------------------------------------------------------------------
    async def finalize(self, body: Mapping[str, Any], patch: MutableMapping[str, Any]) -> None:
        """Terminating at once; the final checkpoint (bounded, skipped when it cannot come), then the pod goes;
        owners garbage-collect the rest."""
        session = session_of(body)
        try:
            spec: SessionSpec | None = parse_spec(body.get("spec") or {}, self.options.image_defaults)
        except SpecError:
            spec = None

        async def target_for(pod: status.PodFacts) -> Target | None:
            target = self._target(body, session, pod)
            if target is None and session.uid not in self._keys and spec is not None:
                target = await self._target_after_restart(body, session, spec, pod)
            return target

        async def write_status(message: str, pod: status.PodFacts | None) -> None:
            await self._write_now(body, session, message, pod, patch)

        async with self._lock(session.uid):
            await self.stopper.finalize(body, session, spec, target_for, write_status)
            await self.relay.forget(session.namespace, session.name)
            self.metrics.forget(session.namespace, session.name)
            for cache in (self._children_ok, self._keys, self._rolled_back):
                cache.pop(session.uid, None)
            logger.info("deleted session=%s/%s", session.namespace, session.name)
        self._locks.pop(session.uid, None)

    async def _write_now(
        self,
        body: Mapping[str, Any],
        session: builders.SessionRef,
        message: str,
        pod: status.PodFacts | None,
        patch: MutableMapping[str, Any],
    ) -> None:
        """Terminating, written straight to the status subresource (kopf would write it only after the wait),
        and to kopf's patch too: kopf's finalizer removal tests the resourceVersion that patch returns."""
        previous = dict(body.get("status") or {})
        obs = status.Observation(
            generation=int(body["metadata"].get("generation") or 1),
            spec_hash=builders.spec_hash(body.get("spec") or {}),
            pod_name=session.name,
            endpoint=builders.endpoint(session),
            deleting=True,
            deleting_why=message,
            pod=pod,
        )
        new = status.compute_status(previous, obs, now_iso())
        patch.setdefault("status", {}).update(new)
        try:
            await self.kube.merge_patch(
                defaults.KIND, session.namespace, session.name, {"status": new}, "status"
            )
        except APIError as err:  # the delete goes on regardless
            logger.warning("status session=%s/%s error=%r", session.namespace, session.name, err)
        event = status.phase_event(previous.get("phase"), new)
        if event is not None:
            self.emit(body, *event)
        self.metrics.set_phase(session.namespace, session.name, new["phase"])

    async def _target_after_restart(
        self, body: Mapping[str, Any], session: builders.SessionRef, spec: SessionSpec, pod: status.PodFacts
    ) -> Target | None:
        """After an operator restart the keys are not cached yet: read them from the Secret."""
        try:
            secret = await self.kube.get(
                "Secret", session.namespace, builders.names(session, spec).curve_secret
            )
            if secret is None:
                return None
            self._keys[session.uid] = client_keys(secret)
        except (ValueError, APIError):
            return None
        return self._target(body, session, pod)


class _Waiting(Exception):
    """Something the session needs does not exist yet (a named Secret or PVC)."""


def _new_curve_keys() -> dict[str, bytes]:
    server_public, server_secret = auth.generate_keypair()
    client_public, client_secret = auth.generate_keypair()
    return dict(
        zip(auth.CURVE_FILES, (server_public, server_secret, client_public, client_secret), strict=True)
    )
