"""spec.checkpoint, spec.auth and spec.pod: what the session's pods mount and where they run, parsed into
frozen dataclasses with every default (the same as the CRD's). hogwild.operator.spec parses the rest (its
docstring says why the operator checks what the API server already checked). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hogwild.operator import fields
from hogwild.operator.fields import SpecError

DEFAULT_STORAGE_SIZE = "20Gi"
DEFAULT_CHECKPOINT_TIMEOUT_S = 300.0
DEFAULT_GRACE_PERIOD_S = 360
ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod")


@dataclass(frozen=True)
class StorageSpec:
    existing_claim: str | None = None
    storage_class: str | None = None
    size: str = DEFAULT_STORAGE_SIZE
    retain_on_delete: bool = False
    # Replicas on different nodes share the one checkpoint volume only with ReadWriteMany.
    access_mode: str = "ReadWriteOnce"


@dataclass(frozen=True)
class CheckpointSpec:
    timeout_s: float = DEFAULT_CHECKPOINT_TIMEOUT_S
    storage: StorageSpec = field(default_factory=StorageSpec)


@dataclass(frozen=True)
class AuthSpec:
    token_secret: str | None = None
    token_key: str = "token"
    curve_secret: str | None = None


@dataclass(frozen=True)
class PodSpec:
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    priority_class: str | None = None
    service_account: str | None = None
    grace_period_s: int = DEFAULT_GRACE_PERIOD_S
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)


def parse_checkpoint(raw: Any) -> CheckpointSpec:
    where = "spec.checkpoint"
    value = fields.obj(where, raw)
    fields.known(where, value, {"intervalSeconds", "keep", "timeoutSeconds", "storage"})
    storage = fields.obj(f"{where}.storage", value.get("storage"))
    fields.known(
        f"{where}.storage",
        storage,
        {"existingClaim", "storageClassName", "size", "retainOnDelete", "accessMode"},
    )
    existing = fields.string(f"{where}.storage.existingClaim", storage.get("existingClaim"))
    if existing and (storage.get("storageClassName") or storage.get("size")):
        raise SpecError(f"{where}.storage: existingClaim excludes storageClassName and size")
    if existing and storage.get("accessMode"):
        raise SpecError(f"{where}.storage: existingClaim excludes accessMode (the claim has its own)")
    size = fields.string(f"{where}.storage.size", storage.get("size"), DEFAULT_STORAGE_SIZE)
    if not fields.STORAGE_SIZE.match(size):
        raise SpecError(f"{where}.storage.size: must be a quantity such as 50Gi, got {size!r}")
    return CheckpointSpec(
        timeout_s=fields.number(
            f"{where}.timeoutSeconds", value.get("timeoutSeconds"), DEFAULT_CHECKPOINT_TIMEOUT_S, 1, 86400
        ),
        storage=StorageSpec(
            existing_claim=existing,
            storage_class=fields.string(f"{where}.storage.storageClassName", storage.get("storageClassName")),
            size=size,
            retain_on_delete=fields.flag(
                f"{where}.storage.retainOnDelete", storage.get("retainOnDelete"), False
            ),
            access_mode=fields.choice(
                f"{where}.storage.accessMode", storage.get("accessMode"), ACCESS_MODES, "ReadWriteOnce"
            ),
        ),
    )


def parse_auth(raw: Any) -> AuthSpec:
    where = "spec.auth"
    value = fields.obj(where, raw)
    fields.known(where, value, {"tokenSecretRef", "curveSecretRef"})
    token = fields.obj(f"{where}.tokenSecretRef", value.get("tokenSecretRef"))
    fields.known(f"{where}.tokenSecretRef", token, {"name", "key"})
    curve = fields.obj(f"{where}.curveSecretRef", value.get("curveSecretRef"))
    fields.known(f"{where}.curveSecretRef", curve, {"name"})
    return AuthSpec(
        token_secret=fields.string(f"{where}.tokenSecretRef.name", token.get("name"), required=bool(token)),
        token_key=fields.string(f"{where}.tokenSecretRef.key", token.get("key"), "token"),
        curve_secret=fields.string(f"{where}.curveSecretRef.name", curve.get("name"), required=bool(curve)),
    )


def parse_pod(raw: Any) -> PodSpec:
    where = "spec.pod"
    value = fields.obj(where, raw)
    allowed = {
        "nodeSelector",
        "tolerations",
        "priorityClassName",
        "serviceAccountName",
        "terminationGracePeriodSeconds",
        "annotations",
        "labels",
    }
    fields.known(where, value, allowed)
    tolerations = value.get("tolerations") or []
    if not isinstance(tolerations, list) or not all(isinstance(t, Mapping) for t in tolerations):
        raise SpecError(f"{where}.tolerations: must be a list of tolerations")
    return PodSpec(
        node_selector=fields.str_map(f"{where}.nodeSelector", value.get("nodeSelector")),
        tolerations=tuple(dict(t) for t in tolerations),
        priority_class=fields.string(f"{where}.priorityClassName", value.get("priorityClassName")),
        service_account=fields.string(f"{where}.serviceAccountName", value.get("serviceAccountName")),
        grace_period_s=fields.whole_number(
            f"{where}.terminationGracePeriodSeconds",
            value.get("terminationGracePeriodSeconds"),
            DEFAULT_GRACE_PERIOD_S,
            30,
            86400,
        ),
        annotations=fields.str_map(f"{where}.annotations", value.get("annotations")),
        labels=fields.str_map(f"{where}.labels", value.get("labels")),
    )
