"""One reconcile per TrainingSession: observe, build the desired children (pure), apply, relay, then compute
the status (pure). Create, resume, update and the status timer all run the same reconcile, under a
per-session lock, so it is idempotent: a second run, or a restarted operator, finds what the first made.

Side effects go through `kube` (API) and `relay` (worker); decisions come from spec/builders/pod_builder/diff/status.
The replica pods (spec.replicas: create, remove, replace) are brought to the spec in `replica_pods`, and every
replica's worker is asked and relayed to in `workers`.
The status is written through kopf's `patch` (kopf sends it to the status subresource after the handler),
except on delete, whose Terminating goes straight to the status before the final checkpoint's wait. What
happens before a pod goes (the final checkpoint, bounded, skipped when it cannot come) is in final_checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import Any

from hogwild import auth, defaults
from hogwild.operator import builders, safety, status
from hogwild.operator.final_checkpoint import EventSink, PodStopper
from hogwild.operator.kube import APIError, Kube
from hogwild.operator.metrics import OperatorMetrics
from hogwild.operator.options import OperatorOptions
from hogwild.operator.relay import Relay, Target, client_keys
from hogwild.operator.replica_pods import ReplicaPods
from hogwild.operator.spec import SessionSpec, SpecError, parse_spec
from hogwild.operator.workers import Workers, now_iso

logger = logging.getLogger(__name__)
# Children other than the pod are re-checked at most this often (and whenever the spec changes).
CHILDREN_RECHECK_S = 300.0


@dataclass(frozen=True)
class Outcome:
    phase: str
    retry_after_s: float | None = None  # ask kopf to run the handler again (waiting for the old pod)
    message: str = ""


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
        self.stopper = PodStopper(options, kube, relay, emit)
        self.pods = ReplicaPods(options, kube, relay, self.stopper, emit)
        self.workers = Workers(options, kube, relay, emit, self._target, self._keys_unsure)

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
        converged = await self.pods.converge(
            body, session, spec, base, lambda i, pod: self._target(body, session, pod, i)
        )
        obs = await self.workers.observe(body, session, spec, converged)
        self.metrics.set_replicas(session.namespace, session.name, spec.replicas, obs.replica_status)
        outcome = self._write(body, session, previous, obs, patch)
        return replace(outcome, retry_after_s=converged.retry_s)

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
        headless = builders.build_replicas_service(session, spec)
        if headless is not None:
            await self.kube.ensure(headless)
        await self.kube.ensure(builders.build_network_policy(session, spec))
        budget = builders.build_disruption_budget(session, spec)
        if budget is not None:
            await self.kube.ensure(budget)
        else:  # one replica: a budget could only block a node's drain
            await self.kube.delete("PodDisruptionBudget", session.namespace, names.disruption_budget)
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

    # ---- the worker -----------------------------------------------------------------------------------
    def _keys_unsure(self, uid: str) -> None:
        """A worker did not answer: re-read the keys next time, in case they changed."""
        self._children_ok.pop(uid, None)

    def _target(
        self, body: Mapping[str, Any], session: builders.SessionRef, pod: status.PodFacts, replica: int = 0
    ) -> Target | None:
        """Where replica `replica`'s worker listens, or None while it cannot (trainer not running, keys not
        read yet).

        With the address override (tests, debugging: comma-separated, one address per replica ordinal) the
        pod's state is not consulted: the worker is elsewhere.
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
            addresses = [a.strip() for a in override.split(",")]
            if replica >= len(addresses):
                return None
            return Target(session.namespace, session.name, addresses[replica], keys, replica)
        if pod.trainer_running and pod.ip:
            return Target(session.namespace, session.name, builders.worker_address(pod.ip), keys, replica)
        return None

    # ---- delete ---------------------------------------------------------------------------------------
    async def finalize(self, body: Mapping[str, Any], patch: MutableMapping[str, Any]) -> None:
        """Terminating at once; the final checkpoint through one replica (bounded, skipped when it cannot
        come), then every replica pod goes; owners garbage-collect the rest."""
        session = session_of(body)
        try:
            spec: SessionSpec | None = parse_spec(body.get("spec") or {}, self.options.image_defaults)
        except SpecError:
            spec = None

        async def target_for(pod: status.PodFacts) -> Target | None:
            replica = ordinals.get(pod.name, 0)
            target = self._target(body, session, pod, replica)
            if target is None and session.uid not in self._keys and spec is not None:
                target = await self._target_after_restart(body, session, spec, pod, replica)
            return target

        async def write_status(message: str, pod: status.PodFacts | None) -> None:
            await self._write_now(body, session, message, pod, patch)

        async with self._lock(session.uid):
            wanted = spec.replicas if spec is not None else 1
            found = await self.pods.find(session, wanted, body.get("status") or {})
            ordinals = {pod["metadata"]["name"]: ordinal for ordinal, pod in found.items()}
            names = [pod["metadata"]["name"] for _, pod in sorted(found.items())]
            await self.stopper.finalize(body, session, spec, target_for, write_status, names)
            # One replica answered for the final checkpoint (the group writes one); the others go now, not at
            # the garbage collector's pace (and the emulator in tests has none).
            for name in names:
                await self.kube.delete("Pod", session.namespace, name)
            await self.relay.forget(session.namespace, session.name)
            self.metrics.forget(session.namespace, session.name)
            for cache in (self._children_ok, self._keys):
                cache.pop(session.uid, None)
            self.workers.forget(session.uid)
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
        self,
        body: Mapping[str, Any],
        session: builders.SessionRef,
        spec: SessionSpec,
        pod: status.PodFacts,
        replica: int = 0,
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
        return self._target(body, session, pod, replica)


class _Waiting(Exception):
    """Something the session needs does not exist yet (a named Secret or PVC)."""


def _new_curve_keys() -> dict[str, bytes]:
    server_public, server_secret = auth.generate_keypair()
    client_public, client_secret = auth.generate_keypair()
    return dict(
        zip(auth.CURVE_FILES, (server_public, server_secret, client_public, client_secret), strict=True)
    )
