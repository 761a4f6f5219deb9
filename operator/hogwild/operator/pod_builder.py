"""The session's pod, built as a plain dict: the vLLM and trainer containers, their volumes, and its hash.

Pod lifecycle: vLLM is a *native sidecar* (an init container with `restartPolicy: Always`) and the trainer
is the pod's main container. Kubernetes starts sidecars first, in order, and stops them last, after every
main container has exited. So the exporter (vLLM) starts before, and always outlives, the importer (the
trainer) that maps its memory; on SIGTERM the trainer checkpoints and releases its mappings before vLLM is
even signalled. A preStop hook on vLLM could only *wait* for the trainer, racing the same grace period,
and would not order start-up at all. Needs Kubernetes >= 1.29 (sidecars beta, on by default; GA in 1.33).

Its own module because the pod is where every restart-requiring field lands (hogwild.operator.diff relies on
it: a changed pod hash means "replace the pod"); the simpler children and the names all of them share are in
hogwild.operator.builders.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from hogwild import defaults, mps
from hogwild.operator.builders import (
    CONFIG_KEY,
    LABEL_INSTANCE,
    LABEL_REPLICA,
    MAX_GROUP_NAME,
    REPLICAS_SUFFIX,
    Names,
    SessionRef,
    metadata,
    names,
    pod_name,
    rendezvous,
    replica_hostname,
)
from hogwild.operator.spec import ContainerSpec, SessionSpec

POD_HASH_ANNOTATION = f"{defaults.API_GROUP}/pod-hash"
BUILT_FROM_ANNOTATION = f"{defaults.API_GROUP}/built-from-spec"
CONFIG_ENV = "HOGWILD_TRAINING_CONFIG"
RESTORE_ENV = defaults.ENV_RESTORE
CURVE_ENV = "HOGWILD_CURVE_DIR"
MODEL_MOUNT = "/models"
TOKEN_MOUNT = "/etc/hogwild/token"
CURVE_MOUNT = "/etc/hogwild/curve"
# The trainer's mount of the CURVE Secret: its own keypair and the operator's public key, never client.secret.
WORKER_CURVE_FILES = ("server.public", "server.secret", "client.public")


def model_dir(spec: SessionSpec) -> str:
    if spec.model.claim_name:
        return f"{MODEL_MOUNT}/{spec.model.path.strip('/')}".rstrip("/")
    return spec.model.path


# ---- containers ---------------------------------------------------------------------------------------
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


# Both images run as this user (images/*/Dockerfile); one UID in both containers is also what MPS needs.
SESSION_UID = 1000
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": SESSION_UID,
    "runAsGroup": SESSION_UID,
    # The checkpoint volume becomes writable by the session's group.
    "fsGroup": SESSION_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
# Not readOnlyRootFilesystem: vLLM, torch.compile and Triton write their caches under $HOME and /tmp.
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
}


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
        "securityContext": dict(CONTAINER_SECURITY_CONTEXT),
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
        "securityContext": dict(CONTAINER_SECURITY_CONTEXT),
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


def build_pod(session: SessionRef, spec: SessionSpec, ordinal: int = 0) -> dict[str, Any]:
    """Replica `ordinal`'s pod, with its hash annotation (a changed hash means: replace the pod).

    The hash leaves out the replica's own fields (its label; with replicas > 1 its group fields, see
    `_join_group`): every replica of a spec has the same hash, and a change of spec.replicas changes no
    pod's hash, so scaling never replaces a pod that stays."""
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
    meta = metadata(session, n.pod, "session")
    meta["labels"] = {**spec.pod.labels, **meta["labels"]}
    meta["annotations"] = annotations
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Always",
        # Legacy CUDA IPC needs one PID namespace between exporter and importer (docs/facts.md).
        "shareProcessNamespace": True,
        "enableServiceLinks": False,
        # Neither container talks to the Kubernetes API: no token in the pod.
        "automountServiceAccountToken": False,
        "securityContext": dict(POD_SECURITY_CONTEXT),
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
    meta["name"] = pod_name(session, ordinal)
    meta["labels"][LABEL_REPLICA] = str(ordinal)
    if spec.replicas > 1:
        _join_group(session, spec, pod_spec, ordinal)
    elif len(session.name) <= MAX_GROUP_NAME:
        # Its DNS name from the start: on a scale-up this pod joins the group in place (the operator tells
        # its worker to, hogwild.operator.workers) and the new replicas find the store it hosts by this name.
        _name_in_group(session, pod_spec, ordinal)
    meta["annotations"][POD_HASH_ANNOTATION] = pod_hash(pod)
    return pod


def _join_group(session: SessionRef, spec: SessionSpec, pod_spec: dict[str, Any], ordinal: int) -> None:
    """What makes a pod a member of the session's replica group (the worker's contract in hogwild.defaults):
    a DNS name under the headless Service, the group's env, and where it may run (`_placement`).

    Pod env and hostname cannot change on a running pod. A pod built for one replica has the DNS name
    already (`build_pod`), and its worker joins when told; an older one without it stays out of the group
    until it is replaced (hogwild.operator.replicas decides when)."""
    _name_in_group(session, pod_spec, ordinal)
    group_env = [
        {"name": defaults.ENV_REPLICA, "value": str(ordinal)},
        {"name": defaults.ENV_RENDEZVOUS, "value": rendezvous(session)},
    ]
    if ordinal == 0:
        group_env.append({"name": defaults.ENV_HOST_STORE, "value": "1"})
    trainer = pod_spec["containers"][0]
    trainer["env"] = [*trainer["env"], *group_env]
    trainer["ports"] = [
        *trainer["ports"],
        {"name": "rendezvous", "containerPort": defaults.RENDEZVOUS_PORT, "protocol": "TCP"},
    ]
    pod_spec.update(_placement(session, spec))


def _name_in_group(session: SessionRef, pod_spec: dict[str, Any], ordinal: int) -> None:
    """`replica-<i>.<session>-replicas.<ns>.svc`, under the headless Service (builders.build_replicas_service)."""
    pod_spec["hostname"] = replica_hostname(ordinal)
    pod_spec["subdomain"] = f"{session.name}{REPLICAS_SUFFIX}"


def _placement(session: SessionRef, spec: SessionSpec) -> dict[str, Any]:
    """Spread the replicas across nodes, unless the checkpoint volume cannot follow them there.

    A new PVC of ReadWriteOnce attaches to one node: a replica scheduled elsewhere would never start (a
    multi-attach error), so the replicas are kept on the node of the others (required pod affinity; the
    first replica goes anywhere). ReadWriteMany, or an existing claim (its mode is the user's choice),
    gets a spread with ScheduleAnyway: worth having (a node's loss takes one replica, not all), never
    worth a replica left Pending on a cluster with fewer GPU nodes than replicas."""
    same_session = {"matchLabels": {LABEL_INSTANCE: session.name}}
    if not spec.checkpoint.storage.existing_claim and spec.checkpoint.storage.access_mode == "ReadWriteOnce":
        term = {"labelSelector": same_session, "topologyKey": "kubernetes.io/hostname"}
        return {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}}
    spread = {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": same_session,
    }
    return {"topologySpreadConstraints": [spread]}


def group_member(pod: Mapping[str, Any]) -> bool:
    """Whether a (found) pod was built as a member of a replica group: its trainer has the rendezvous."""
    for container in pod.get("spec", {}).get("containers", []):
        if container.get("name") == "trainer":
            return any(e.get("name") == defaults.ENV_RENDEZVOUS for e in container.get("env", []))
    return False


def record_built_from(pod: dict[str, Any], raw_spec: Mapping[str, Any]) -> dict[str, Any]:
    """`pod` with the CR spec it was built from, so that a later restart can say which field replaced it.

    Outside the hash: hot changes never touch the pod, so this copy may lag in hot fields, never in others."""
    pod["metadata"]["annotations"][BUILT_FROM_ANNOTATION] = json.dumps(
        raw_spec, sort_keys=True, separators=(",", ":")
    )
    return pod


GROUP_ENV = frozenset({defaults.ENV_REPLICA, defaults.ENV_RENDEZVOUS, defaults.ENV_HOST_STORE})
GROUP_POD_FIELDS = ("hostname", "subdomain", "topologySpreadConstraints", "affinity")


def _without_replica(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A pod spec less what `_join_group` adds: what every replica of one session spec has in common."""
    out = {k: v for k, v in spec.items() if k not in GROUP_POD_FIELDS}
    containers = []
    for container in spec.get("containers", []):
        container = dict(container)
        if "env" in container:
            container["env"] = [e for e in container["env"] if e.get("name") not in GROUP_ENV]
        if "ports" in container:
            container["ports"] = [p for p in container["ports"] if p.get("name") != "rendezvous"]
        containers.append(container)
    if "containers" in spec:
        out["containers"] = containers
    return out


def pod_hash(pod: Mapping[str, Any]) -> str:
    """Hash of what a pod was built from: its spec, labels and annotations (but not the hash itself), less
    the replica's own fields (its label and group fields): every replica of a spec has one hash, and a change
    of spec.replicas changes no pod's hash."""
    meta = pod.get("metadata", {})
    annotations = {
        k: v
        for k, v in meta.get("annotations", {}).items()
        if k not in {POD_HASH_ANNOTATION, BUILT_FROM_ANNOTATION}
    }
    labels = {k: v for k, v in meta.get("labels", {}).items() if k != LABEL_REPLICA}
    content = {"labels": labels, "annotations": annotations, "spec": _without_replica(pod.get("spec", {}))}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
