"""The objects a TrainingSession owns besides its pod, built as plain dicts: Service, ConfigMap, PVC and
Secrets, and the names and labels every child (the pod too) shares.

Every child has a deterministic name derived from the session's (the emulator in tests has no label
selectors, and a deterministic name is what makes a second reconcile find, not duplicate, its children).
The pod, the one child with real structure, is built in hogwild.operator.pod_builder.

Pure: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hogwild import defaults
from hogwild.config import config_to_dict
from hogwild.operator.spec import SessionSpec

API_VERSION = f"{defaults.API_GROUP}/{defaults.API_VERSION}"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
# Which replica a pod is (0..replicas-1); the PodMonitor copies it into every worker series as `replica`.
LABEL_REPLICA = f"{defaults.API_GROUP}/replica"
# Tests and debugging (only with --allow-worker-address-override): where the workers listen instead of the
# pods, comma-separated, one address per replica ordinal (a replica beyond the list is not asked).
WORKER_ADDRESS_ANNOTATION = f"{defaults.API_GROUP}/worker-address"
CONFIG_KEY = "training.json"
# A Service name (and a pod's subdomain) is a DNS label of at most 63 characters; the CRD refuses
# spec.replicas > 1 for a longer session name.
REPLICAS_SUFFIX = "-replicas"
MAX_GROUP_NAME = 63 - len(REPLICAS_SUFFIX)
# hogwild.auth's key files (not imported: auth needs zmq, and this module stays pure; a test keeps them equal).
CURVE_FILES = ("server.public", "server.secret", "client.public", "client.secret")


@dataclass(frozen=True)
class SessionRef:
    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class Names:
    pod: str
    service: str
    config: str
    pvc: str
    token_secret: str
    curve_secret: str
    replicas_service: str  # headless: per-replica DNS names for the group's rendezvous
    disruption_budget: str
    network_policy: str


def names(session: SessionRef, spec: SessionSpec) -> Names:
    base = session.name
    return Names(
        pod=base,
        service=base,
        replicas_service=f"{base}{REPLICAS_SUFFIX}",
        disruption_budget=base,
        network_policy=base,
        config=f"{base}-config",
        pvc=spec.checkpoint.storage.existing_claim or f"{base}-checkpoints",
        token_secret=spec.auth.token_secret or f"{base}-token",
        curve_secret=spec.auth.curve_secret or f"{base}-curve",
    )


def pod_name(session: SessionRef, ordinal: int) -> str:
    """Replica 0 keeps the one-replica session's pod name (scaling up never renames the serving pod); replica
    i >= 1 is `<session>-<i>`. Those cannot collide with this session's other children (their suffixes are
    words), but can with another session's pod (a session named `chat-1` beside `chat` at 2 replicas): the
    reconcile checks a found pod's owner before taking it for its own."""
    return session.name if ordinal == 0 else f"{session.name}-{ordinal}"


def replica_hostname(ordinal: int) -> str:
    """The pod's `spec.hostname`: a DNS label whatever the session's name (which may hold dots or be long)."""
    return f"replica-{ordinal}"


def rendezvous(session: SessionRef) -> str:
    """host:port of the group's TCPStore: replica 0's worker, through the headless Service's DNS."""
    host = f"{replica_hostname(0)}.{session.name}{REPLICAS_SUFFIX}.{session.namespace}.svc"
    return f"{host}:{defaults.RENDEZVOUS_PORT}"


def selector_labels(session: SessionRef) -> dict[str, str]:
    return {LABEL_NAME: "hogwild", LABEL_INSTANCE: session.name}


def labels(session: SessionRef, component: str) -> dict[str, str]:
    return {
        **selector_labels(session),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "hogwild-operator",
    }


def owner_reference(session: SessionRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": defaults.KIND,
        "name": session.name,
        "uid": session.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(session: SessionRef, name: str, component: str, *, owned: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": session.namespace,
        "labels": labels(session, component),
    }
    if owned:
        meta["ownerReferences"] = [owner_reference(session)]
    return meta


def worker_address(pod_ip: str) -> str:
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"tcp://{host}:{defaults.WORKER_CONTROL_PORT}"


def endpoint(session: SessionRef) -> str:
    return f"http://{session.name}.{session.namespace}.svc:{defaults.VLLM_HTTP_PORT}"


def config_json(spec: SessionSpec) -> str:
    return json.dumps(config_to_dict(spec.training), sort_keys=True, separators=(",", ":"))


def spec_hash(raw_spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(raw_spec, sort_keys=True).encode()).hexdigest()[:16]


# ---- the pod's neighbours -----------------------------------------------------------------------------
def build_service(session: SessionRef, spec: SessionSpec) -> dict[str, Any]:
    n = names(session, spec)
    ports = [
        {"name": "http", "port": defaults.VLLM_HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
        {"name": "metrics", "port": defaults.WORKER_METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
        {"name": "control", "port": defaults.WORKER_CONTROL_PORT, "targetPort": "control", "protocol": "TCP"},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(session, n.service, "session"),
        "spec": {"type": "ClusterIP", "selector": selector_labels(session), "ports": ports},
    }


def build_replicas_service(session: SessionRef, spec: SessionSpec) -> dict[str, Any] | None:
    """The headless Service behind `replica-<i>.<session>-replicas.<ns>.svc`, the group's rendezvous.

    Made for every session, one replica too: a pod built for a group keeps resolving its own store's name
    after a scale down to one, and a one-replica pod (no hostname or subdomain) gets no record from it. Not-ready
    pods are published: a joining replica must reach the store before its vLLM is ready. None for a session
    name too long to carry the suffix (such a session has one replica)."""
    if len(session.name) > MAX_GROUP_NAME:
        return None
    n = names(session, spec)
    ports = [
        {
            "name": "rendezvous",
            "port": defaults.RENDEZVOUS_PORT,
            "targetPort": defaults.RENDEZVOUS_PORT,
            "protocol": "TCP",
        }
    ]
    service_spec = {
        "clusterIP": "None",
        "publishNotReadyAddresses": True,
        "selector": selector_labels(session),
        "ports": ports,
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(session, n.replicas_service, "replicas"),
        "spec": service_spec,
    }


def build_disruption_budget(session: SessionRef, spec: SessionSpec) -> dict[str, Any] | None:
    """At most one replica evicted at a time (a node drain), or None for one replica: a budget there could
    only block a drain, never keep anything serving."""
    if spec.replicas <= 1:
        return None
    n = names(session, spec)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(session, n.disruption_budget, "session"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(session)}},
    }


def build_network_policy(session: SessionRef, spec: SessionSpec) -> dict[str, Any]:
    """Who may reach the session's pods: anyone on the ports they serve (the OpenAI API and /train, which
    checks its token; /metrics; the worker's control port, which is CURVE-authenticated), and the session's
    own pods on every port. torch.distributed authenticates nothing: the group's store (29500) and gloo's
    connections (ports it picks at random) must stay among the replicas. Made for every session, as the
    headless Service is: a pod built for a group keeps hosting the store after a scale down to one.
    Enforced only where the cluster's network plugin enforces NetworkPolicy (docs/replicas.md)."""
    n = names(session, spec)
    served = [
        {"port": port, "protocol": "TCP"}
        for port in (defaults.VLLM_HTTP_PORT, defaults.WORKER_METRICS_PORT, defaults.WORKER_CONTROL_PORT)
    ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(session, n.network_policy, "session"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(session)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": served},
                {"from": [{"podSelector": {"matchLabels": selector_labels(session)}}]},
            ],
        },
    }


def build_config_map(session: SessionRef, spec: SessionSpec) -> dict[str, Any]:
    n = names(session, spec)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(session, n.config, "config"),
        "data": {CONFIG_KEY: config_json(spec)},
    }


def build_pvc(session: SessionRef, spec: SessionSpec) -> dict[str, Any] | None:
    """The checkpoint PVC, or None when the spec names an existing claim."""
    storage = spec.checkpoint.storage
    if storage.existing_claim:
        return None
    n = names(session, spec)
    pvc_spec: dict[str, Any] = {
        "accessModes": [storage.access_mode],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class:
        pvc_spec["storageClassName"] = storage.storage_class
    meta = metadata(session, n.pvc, "checkpoints", owned=not storage.retain_on_delete)
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": pvc_spec}


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def build_token_secret(session: SessionRef, spec: SessionSpec, token: str) -> dict[str, Any]:
    n = names(session, spec)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(session, n.token_secret, "token"),
        "type": "Opaque",
        "data": {spec.auth.token_key: _b64(token)},
    }


def build_curve_secret(session: SessionRef, spec: SessionSpec, keys: Mapping[str, bytes]) -> dict[str, Any]:
    """`keys` maps each of hogwild.auth.CURVE_FILES to its Z85 text."""
    missing = set(CURVE_FILES) - set(keys)
    if missing:
        raise ValueError(f"CURVE keys missing: {', '.join(sorted(missing))}")
    n = names(session, spec)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(session, n.curve_secret, "curve"),
        "type": "Opaque",
        "data": {name: _b64(keys[name]) for name in CURVE_FILES},
    }
