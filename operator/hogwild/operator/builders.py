"""The objects a TrainingSession owns, built as plain dicts: pod, Service, ConfigMap, PVC and Secrets.

Every child has a deterministic name derived from the session's (the emulator in tests has no label
selectors, and a deterministic name is what makes a second reconcile find, not duplicate, its children).

Pod lifecycle: vLLM is a *native sidecar* (an init container with `restartPolicy: Always`) and the trainer
is the pod's main container. Kubernetes starts sidecars first, in order, and stops them last, after every
main container has exited. So the exporter (vLLM) starts before, and always outlives, the importer (the
trainer) that maps its memory; on SIGTERM the trainer checkpoints and releases its mappings before vLLM is
even signalled. A preStop hook on vLLM could only *wait* for the trainer, racing the same grace period,
and would not order start-up at all. Needs Kubernetes >= 1.29 (sidecars beta, on by default; GA in 1.33).

Pure: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hogwild import defaults, mps
from hogwild.config import config_to_dict
from hogwild.operator.spec import ContainerSpec, SessionSpec

API_VERSION = f"{defaults.API_GROUP}/{defaults.API_VERSION}"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
POD_HASH_ANNOTATION = f"{defaults.API_GROUP}/pod-hash"
WORKER_ADDRESS_ANNOTATION = f"{defaults.API_GROUP}/worker-address"
CONFIG_KEY = "training.json"
CONFIG_ENV = "HOGWILD_TRAINING_CONFIG"
RESTORE_ENV = defaults.ENV_RESTORE
CURVE_ENV = "HOGWILD_CURVE_DIR"
MODEL_MOUNT = "/models"
TOKEN_MOUNT = "/etc/hogwild/token"
CURVE_MOUNT = "/etc/hogwild/curve"
# hogwild.auth's key files (not imported: auth needs zmq, and this module stays pure; a test keeps them equal).
CURVE_FILES = ("server.public", "server.secret", "client.public", "client.secret")
# The trainer's mount of the CURVE Secret: its own keypair and the operator's public key, never client.secret.
WORKER_CURVE_FILES = ("server.public", "server.secret", "client.public")


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


def names(session: SessionRef, spec: SessionSpec) -> Names:
    base = session.name
    return Names(
        pod=base,
        service=base,
        config=f"{base}-config",
        pvc=spec.checkpoint.storage.existing_claim or f"{base}-checkpoints",
        token_secret=spec.auth.token_secret or f"{base}-token",
        curve_secret=spec.auth.curve_secret or f"{base}-curve",
    )


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


def _metadata(session: SessionRef, name: str, component: str, *, owned: bool = True) -> dict[str, Any]:
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


def model_dir(spec: SessionSpec) -> str:
    if spec.model.claim_name:
        return f"{MODEL_MOUNT}/{spec.model.path.strip('/')}".rstrip("/")
    return spec.model.path


def config_json(spec: SessionSpec) -> str:
    return json.dumps(config_to_dict(spec.training), sort_keys=True, separators=(",", ":"))


# ---- the pod ------------------------------------------------------------------------------------------
def _resources(container: ContainerSpec, spec: SessionSpec, *, gpu_limit: bool) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if container.requests:
        resources["requests"] = dict(container.requests)
    limits = dict(container.limits)
    if gpu_limit:
        limits[spec.gpu.resource_name] = str(spec.gpu.count)
    if limits:
        resources["limits"] = limits
    if spec.gpu.count and spec.gpu.sharing == "DRA":
        # One claim, referenced by both containers: both see the same GPU.
        resources["claims"] = [{"name": "gpu"}]
    return resources


def _env(pairs: Mapping[str, str], extra: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in pairs.items()]
    env += [{"name": k, "value": v} for k, v in extra if k not in pairs]
    return env


def _mounts(spec: SessionSpec, *, checkpoints_read_only: bool) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": "run", "mountPath": defaults.RUN_DIR},
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "checkpoints", "mountPath": defaults.CHECKPOINT_DIR, "readOnly": checkpoints_read_only},
    ]
    if spec.model.claim_name:
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    return mounts


def _vllm_container(spec: SessionSpec, n: Names) -> dict[str, Any]:
    args = ["--model", model_dir(spec)]
    if spec.model.served_name:
        args += ["--served-model-name", spec.model.served_name]
    args += ["--checkpoint-dir", defaults.CHECKPOINT_DIR, "--run-dir", defaults.RUN_DIR]
    args += ["--port", str(defaults.VLLM_HTTP_PORT), "--", *spec.vllm.args]
    health = {"httpGet": {"path": "/health", "port": "http"}}
    base_env = {
        defaults.ENV_RUN_DIR: defaults.RUN_DIR,
        defaults.ENV_CHECKPOINT_DIR: defaults.CHECKPOINT_DIR,
        defaults.ENV_TOKEN_FILE: f"{TOKEN_MOUNT}/{spec.auth.token_key}",
        RESTORE_ENV: spec.model.restore,
    }
    if spec.gpu.mps:
        # vllm starts first, so `hogwild vllm` starts the MPS daemon (before any CUDA) for both clients.
        base_env.update({**mps.serving_env(mps.POD_DIRS), mps.ENV_START_DAEMON: "1"})
    device_plugin = spec.gpu.count > 0 and spec.gpu.sharing == "DevicePlugin"
    return {
        "name": "vllm",
        "image": spec.images.vllm,
        "imagePullPolicy": spec.images.pull_policy,
        # Native sidecar: started first, stopped last (see the module docstring).
        "restartPolicy": "Always",
        "command": ["hogwild", "vllm"],
        "args": args,
        "env": _env(base_env, spec.vllm.env),
        "ports": [{"name": "http", "containerPort": defaults.VLLM_HTTP_PORT, "protocol": "TCP"}],
        "resources": _resources(spec.vllm, spec, gpu_limit=device_plugin),
        "volumeMounts": [
            *_mounts(spec, checkpoints_read_only=True),
            {"name": "token", "mountPath": TOKEN_MOUNT, "readOnly": True},
        ],
        # Loading a large model takes minutes: the startup probe allows 30, and gates the trainer's start.
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {**health, "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {**health, "periodSeconds": 20, "failureThreshold": 6},
    }


def _trainer_container(spec: SessionSpec, n: Names) -> dict[str, Any]:
    base_env: dict[str, str] = {
        defaults.ENV_RUN_DIR: defaults.RUN_DIR,
        defaults.ENV_CHECKPOINT_DIR: defaults.CHECKPOINT_DIR,
        CURVE_ENV: CURVE_MOUNT,
        RESTORE_ENV: spec.model.restore,
    }
    if spec.gpu.count > 0 and spec.gpu.sharing == "DevicePlugin":
        # Device-plugin fallback: only vLLM requests the GPU; the trainer sees every GPU of the node and picks
        # the one whose UUID the weight manifest names. This escapes the scheduler's accounting (nothing stops
        # it from touching other pods' GPUs) and needs the NVIDIA runtime to accept the variable from an
        # unprivileged container. DRA has neither problem; use it where the cluster has it.
        base_env["NVIDIA_VISIBLE_DEVICES"] = "all"
    if spec.gpu.mps:
        # Unverified on a cluster: MPS between containers relies on the pod's shared IPC and PID namespaces
        # (shareProcessNamespace), the pipe dir on the shared /run/hogwild emptyDir, and one UID (1000 in
        # both images): a client of another user would wait for the daemon's server to go idle.
        base_env.update(mps.trainer_env(mps.POD_DIRS, spec.gpu.mps.trainer_share_percent))
    env = _env(base_env, spec.trainer.env)
    # The desired hyperparameters live in a ConfigMap the operator keeps current: a restarted trainer starts
    # with them, and changing them never changes (so never restarts) the pod.
    env.append({"name": CONFIG_ENV, "valueFrom": {"configMapKeyRef": {"name": n.config, "key": CONFIG_KEY}}})
    probe = {"tcpSocket": {"port": "metrics"}}
    return {
        "name": "trainer",
        "image": spec.images.trainer,
        "imagePullPolicy": spec.images.pull_policy,
        "command": ["hogwild", "worker"],
        "args": [
            "--run-dir",
            defaults.RUN_DIR,
            "--checkpoint-dir",
            defaults.CHECKPOINT_DIR,
            "--metrics-port",
            str(defaults.WORKER_METRICS_PORT),
            "--control-port",
            str(defaults.WORKER_CONTROL_PORT),
            "--config",
            f"$({CONFIG_ENV})",
        ],
        "env": env,
        "ports": [
            {"name": "metrics", "containerPort": defaults.WORKER_METRICS_PORT, "protocol": "TCP"},
            {"name": "control", "containerPort": defaults.WORKER_CONTROL_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(spec.trainer, spec, gpu_limit=False),
        "volumeMounts": [
            *_mounts(spec, checkpoints_read_only=False),
            {"name": "curve", "mountPath": CURVE_MOUNT, "readOnly": True},
        ],
        "readinessProbe": {**probe, "periodSeconds": 10},
        "livenessProbe": {**probe, "periodSeconds": 20, "failureThreshold": 6},
    }


def _volumes(spec: SessionSpec, n: Names) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "run", "emptyDir": {"medium": "Memory"}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": n.pvc}},
        {"name": "token", "secret": {"secretName": n.token_secret, "defaultMode": 0o400}},
        {
            "name": "curve",
            "secret": {
                "secretName": n.curve_secret,
                "defaultMode": 0o400,
                "items": [{"key": key, "path": key} for key in WORKER_CURVE_FILES],
            },
        },
    ]
    if spec.model.claim_name:
        volumes.append(
            {"name": "model", "persistentVolumeClaim": {"claimName": spec.model.claim_name, "readOnly": True}}
        )
    return volumes


def build_pod(session: SessionRef, spec: SessionSpec) -> dict[str, Any]:
    """The session's pod, with its hash annotation (a changed hash means: replace the pod)."""
    n = names(session, spec)
    annotations = dict(spec.pod.annotations)
    if spec.metrics_enabled:
        annotations.update(
            {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(defaults.WORKER_METRICS_PORT),
                "prometheus.io/path": "/metrics",
            }
        )
    meta = _metadata(session, n.pod, "session")
    meta["labels"] = {**spec.pod.labels, **meta["labels"]}
    meta["annotations"] = annotations
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Always",
        # Legacy CUDA IPC needs one PID namespace between exporter and importer (FACTS.md).
        "shareProcessNamespace": True,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.pod.grace_period_s,
        "initContainers": [_vllm_container(spec, n)],
        "containers": [_trainer_container(spec, n)],
        "volumes": _volumes(spec, n),
    }
    if spec.gpu.count and spec.gpu.sharing == "DRA":
        claim = (
            {"resourceClaimName": spec.gpu.claim_name}
            if spec.gpu.claim_name
            else {"resourceClaimTemplateName": spec.gpu.claim_template_name}
        )
        pod_spec["resourceClaims"] = [{"name": "gpu", **claim}]
    if spec.pod.node_selector:
        pod_spec["nodeSelector"] = dict(spec.pod.node_selector)
    if spec.pod.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.pod.tolerations]
    if spec.pod.priority_class:
        pod_spec["priorityClassName"] = spec.pod.priority_class
    if spec.pod.service_account:
        pod_spec["serviceAccountName"] = spec.pod.service_account
    if spec.images.pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.images.pull_secrets]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}
    meta["annotations"][POD_HASH_ANNOTATION] = pod_hash(pod)
    return pod


def pod_hash(pod: Mapping[str, Any]) -> str:
    """Hash of what a pod was built from: its spec, labels and annotations (but not the hash itself)."""
    meta = pod.get("metadata", {})
    annotations = {k: v for k, v in meta.get("annotations", {}).items() if k != POD_HASH_ANNOTATION}
    content = {"labels": meta.get("labels", {}), "annotations": annotations, "spec": pod.get("spec", {})}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def spec_hash(raw_spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(raw_spec, sort_keys=True).encode()).hexdigest()[:16]


# ---- the rest -----------------------------------------------------------------------------------------
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
        "metadata": _metadata(session, n.service, "session"),
        "spec": {"type": "ClusterIP", "selector": selector_labels(session), "ports": ports},
    }


def build_config_map(session: SessionRef, spec: SessionSpec) -> dict[str, Any]:
    n = names(session, spec)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(session, n.config, "config"),
        "data": {CONFIG_KEY: config_json(spec)},
    }


def build_pvc(session: SessionRef, spec: SessionSpec) -> dict[str, Any] | None:
    """The checkpoint PVC, or None when the spec names an existing claim."""
    storage = spec.checkpoint.storage
    if storage.existing_claim:
        return None
    n = names(session, spec)
    pvc_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class:
        pvc_spec["storageClassName"] = storage.storage_class
    meta = _metadata(session, n.pvc, "checkpoints", owned=not storage.retain_on_delete)
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": pvc_spec}


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def build_token_secret(session: SessionRef, spec: SessionSpec, token: str) -> dict[str, Any]:
    n = names(session, spec)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(session, n.token_secret, "token"),
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
        "metadata": _metadata(session, n.curve_secret, "curve"),
        "type": "Opaque",
        "data": {name: _b64(keys[name]) for name in CURVE_FILES},
    }
