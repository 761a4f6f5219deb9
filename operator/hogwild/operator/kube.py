"""Kubernetes API calls, through kopf's own authenticated client (no other Kubernetes library).

Thin: URLs, verbs and error mapping only. It uses kopf's internal `kopf._cogs.clients.api` (pinned
kopf==1.45.2), which carries the operator's credentials and retries; the calls must run inside the
operator (a handler, a timer, or a startup activity), where kopf has set up those credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kopf import OperatorSettings
from kopf._cogs.clients import api, errors

from hogwild import defaults

logger = logging.getLogger(__name__)

# kind -> (API prefix, plural)
RESOURCES = {
    "Pod": ("api/v1", "pods"),
    "Service": ("api/v1", "services"),
    "ConfigMap": ("api/v1", "configmaps"),
    "Secret": ("api/v1", "secrets"),
    "PersistentVolumeClaim": ("api/v1", "persistentvolumeclaims"),
    "PodDisruptionBudget": ("apis/policy/v1", "poddisruptionbudgets"),
    "NetworkPolicy": ("apis/networking.k8s.io/v1", "networkpolicies"),
    defaults.KIND: (f"apis/{defaults.API_GROUP}/{defaults.API_VERSION}", "trainingsessions"),
}
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}

NotFound = errors.APINotFoundError
Conflict = errors.APIConflictError
APIError = errors.APIError


def url(kind: str, namespace: str, name: str | None = None) -> str:
    prefix, plural = RESOURCES[kind]
    base = f"/{prefix}/namespaces/{namespace}/{plural}"
    return f"{base}/{name}" if name else base


class Kube:
    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = await api.get(
                url(kind, namespace, name), settings=self.settings, logger=logger
            )
        except NotFound:
            return None
        return found

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        created: dict[str, Any] = await api.post(
            url(obj["kind"], meta["namespace"]), payload=dict(obj), settings=self.settings, logger=logger
        )
        return created

    async def ensure(self, obj: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """The existing object, or the new one: (object, created). Never overwrites."""
        kind, meta = obj["kind"], obj["metadata"]
        found = await self.get(kind, meta["namespace"], meta["name"])
        if found is not None:
            return found, False
        try:
            return await self.create(obj), True
        except Conflict:  # another writer won the race; theirs stands
            again = await self.get(kind, meta["namespace"], meta["name"])
            if again is None:
                raise
            return again, False

    async def merge_patch(
        self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], subresource: str = ""
    ) -> dict[str, Any]:
        """`subresource`: e.g. "status", for a status written before a handler returns."""
        patched: dict[str, Any] = await api.patch(
            url(kind, namespace, name) + (f"/{subresource}" if subresource else ""),
            payload=dict(patch),
            headers=MERGE_PATCH,
            settings=self.settings,
            logger=logger,
        )
        return patched

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """True when a delete was issued, False when the object was already gone."""
        try:
            await api.delete(url(kind, namespace, name), settings=self.settings, logger=logger)
        except NotFound:
            return False
        return True
