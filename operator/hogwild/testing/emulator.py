"""A Kubernetes API emulator for the operator's tests and benchmark (needs the [test] extra: kmock).

kmock's `KubernetesEmulator` stores, lists, watches, patches and deletes objects, but stamps no metadata.
This subclass adds what the operator and kopf rely on, as a real API server would:
- `uid`, `resourceVersion`, `creationTimestamp`, `generation` (bumped only when `spec` changes) and names
  for `generateName` (kopf's Events);
- status subresources: a PATCH of `.../status` changes only `status`, and a PATCH of the object leaves
  `status` alone, for the resources that declare one;
- a pod starts in phase Pending.
It still has no selectors, no server-side apply, no garbage collection and no admission.

`python -m hogwild.testing.emulator --port N` serves one until killed (the benchmark runs it in its own
process, so that the operator's memory is measured alone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import secrets
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs
import kmock
from kmock._internal import dicts as kmock_dicts
from kopf.testing import KopfRunner

from hogwild import defaults
from hogwild.operator.handlers import Operator

# (resource, kind, namespaced, subresources)
RESOURCES: tuple[tuple[str, str, bool, set[str]], ...] = (
    (f"{defaults.API_GROUP}/{defaults.API_VERSION}/trainingsessions", defaults.KIND, True, {"status"}),
    ("v1/pods", "Pod", True, {"status"}),
    ("v1/services", "Service", True, {"status"}),
    ("v1/configmaps", "ConfigMap", True, set()),
    ("v1/secrets", "Secret", True, set()),
    ("v1/persistentvolumeclaims", "PersistentVolumeClaim", True, {"status"}),
    ("policy/v1/poddisruptionbudgets", "PodDisruptionBudget", True, {"status"}),
    ("v1/events", "Event", True, set()),
    ("v1/namespaces", "Namespace", False, {"status"}),  # kopf waits for it in discovery
    ("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", False, set()),
    ("kopf.dev/v1/kopfpeerings", "KopfPeering", True, set()),
)
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}


def _rbac_verb(action: kmock.action, method: str) -> str:
    """The RBAC verb of a request: kmock's UPDATE is a PATCH or a PUT, its FETCH a get."""
    if action == kmock.action.UPDATE:
        return "patch" if method.upper().endswith("PATCH") else "update"
    return "get" if action == kmock.action.FETCH else str(action.value).lower()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _stamp_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    calls: list[tuple[str | None, str | None]] = attrs.field(factory=list, init=False)
    # (group, resource[/subresource], verb) of every request whose User-Agent is kopf's (the operator's), in
    # RBAC's terms: what the operator's Role must grant.
    operator_verbs: set[tuple[str, str, str]] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for resource, kind, namespaced, subresources in RESOURCES:
            self.resources[resource] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=VERBS, subresources=subresources
            )

    def _has_status(self, resource: kmock.resource) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    async def _handle(self, request: kmock.Request) -> Any:
        plural = request.resource.plural if request.resource is not None else None
        self.calls.append((request.action.value if request.action else None, plural))
        agent = request.headers.get("User-Agent", "")
        if (
            request.resource is not None
            and plural
            and request.action is not None
            and agent.startswith("kopf/")
        ):
            resource = plural + (f"/{request.subresource}" if request.subresource else "")
            verb = _rbac_verb(request.action, str(request.method))
            self.operator_verbs.add((request.resource.group or "", resource, verb))
        try:
            return await self._stamp_and_handle(request)
        finally:
            # kmock matches every request against its whole request log (quadratic over a run); keep only
            # the requests in flight there, and the (action, plural) of each in `calls`.
            with contextlib.suppress(ValueError):
                self._requests.remove(request)

    async def _stamp_and_handle(self, request: kmock.Request) -> Any:
        if request.resource is None or request.action not in {kmock.action.CREATE, kmock.action.UPDATE}:
            return await super()._handle(request)
        async with self._stamp_lock:
            # kmock stores `request.data` itself, so the stamps go into it in place.
            if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                stamped = self._stamp_create(request)
                request.data.clear()
                request.data.update(stamped)
            elif request.name is not None and isinstance(request.data, dict | list):
                stamped = self._stamp_update(request)
                request.data.clear()
                request.data.extend(stamped) if isinstance(request.data, list) else request.data.update(
                    stamped
                )
            return await super()._handle(request)

    def _stamp_create(self, request: kmock.Request) -> dict[str, Any]:
        data = dict(request.data or {})
        meta = dict(data.get("metadata") or {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta.update(
            uid=str(uuid.uuid4()),
            resourceVersion=str(next(self._versions)),
            generation=1,
            creationTimestamp=_now(),
        )
        data["metadata"] = meta
        assert request.resource is not None
        if self._has_status(request.resource):
            data.pop("status", None)
        if request.resource.plural == "pods":
            data["status"] = {"phase": "Pending"}
        return data

    def _stamp_update(self, request: kmock.Request) -> Any:
        assert request.resource is not None
        old = self.get(request.resource, request.namespace, request.name or "") or {}
        patch = request.data
        version = str(next(self._versions))
        if isinstance(patch, list):  # a JSON patch
            return [*patch, {"op": "add", "path": "/metadata/resourceVersion", "value": version}]
        patch = dict(patch or {})
        if self._has_status(request.resource):
            if request.subresource == "status":
                patch = {"status": patch.get("status")} if "status" in patch else {}
            else:
                patch.pop("status", None)
        meta = dict(patch.get("metadata") or {})
        meta["resourceVersion"] = version
        new = kmock_dicts.patch_dict(old, patch) if old else patch
        if old and new.get("spec") != old.get("spec"):
            meta["generation"] = int(old.get("metadata", {}).get("generation") or 1) + 1
        patch["metadata"] = meta
        return patch

    # ---- helpers for tests ----------------------------------------------------------------------------
    def get(  # type: ignore[override]
        self, resource: str | kmock.resource, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        """The stored object, or None (deleted or never created)."""
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects:
            return None
        obj = self.objects[key]
        return None if obj.deleted else obj.raw

    def watching(self, plural: str) -> bool:
        """Whether a client has opened a watch on that resource (kopf is ready for new objects)."""
        return (kmock.action.WATCH.value, plural) in self.calls

    def count(self, action: str, plural: str) -> int:
        """How many requests of that action (create, update, delete, fetch, list, watch) reached `plural`."""
        return self.calls.count((kmock.action(action).value, plural))


def objects_of(emulator: Emulator, plural: str) -> list[Mapping[str, Any]]:
    return [
        obj.raw
        for (res, _, _), obj in list(emulator.objects.items())
        if res.plural == plural and not obj.deleted
    ]


@contextlib.asynccontextmanager
async def running(operator: Operator, *args: str, timeout_s: float = 60.0) -> AsyncIterator[KopfRunner]:
    """Run `operator` with KopfRunner (`kopf run ARGS`) in its own thread while the caller's loop goes on.

    Entering and leaving happen in a worker thread, so that the caller's loop (where an emulator may be
    serving the operator's requests) keeps running while kopf starts and stops.
    """
    runner = KopfRunner(
        ["run", *args], registry=operator.registry, settings=operator.settings, timeout=timeout_s
    )
    await asyncio.to_thread(runner.__enter__)
    try:
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)


async def serve(port: int) -> None:
    async with Emulator() as emulator, kmock.Server(emulator, port=port):
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="serve the hogwild Kubernetes API emulator")
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
