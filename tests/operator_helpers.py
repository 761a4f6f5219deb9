"""Support for the operator flow tests: two clusters behind one interface, and a protocol-level worker.

- `EmulatorCluster`: the kmock emulator (hogwild.testing.emulator) in the test's event loop. It has no
  kubelet, so `mark_running` plays one (pod status through the status subresource).
- `KubectlCluster`: a real cluster through the real kubectl (KUBECONFIG), in a namespace of its own. Where no
  kubelet runs the pod (not scheduled: an API server without scheduler or kubelet), `mark_running` plays one
  the same way. Teardown leaves nothing behind: sessions deleted, the namespace gone, not `Terminating`.
- `FakeWorker`: answers status/configure/checkpoint over tcp with CURVE, exactly per hogwild.protocol, and
  records what it was asked (the flows that need control over the worker's answers use it; the hot-update
  flow uses the real worker).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import zmq

from hogwild import defaults
from hogwild.config import TrainingConfig, apply_changes, config_to_dict
from hogwild.protocol import (
    CheckpointRequest,
    ConfigureRequest,
    JoinRequest,
    ProtocolError,
    StatusRequest,
    decode_request,
    encode_error,
    encode_reply,
    request_id_of,
)
from hogwild.testing.emulator import Emulator
from operator_process import FAST_ARGS, OperatorProcess, free_port, start_operator

CRD = Path(__file__).resolve().parents[1] / "crds" / "hogwild.dev_trainingsessions.yaml"

GROUP_VERSION = f"{defaults.API_GROUP}/{defaults.API_VERSION}"
RESOURCES = {
    "TrainingSession": f"{GROUP_VERSION}/trainingsessions",
    "Pod": "v1/pods",
    "Service": "v1/services",
    "ConfigMap": "v1/configmaps",
    "Secret": "v1/secrets",
    "PersistentVolumeClaim": "v1/persistentvolumeclaims",
    "PodDisruptionBudget": "policy/v1/poddisruptionbudgets",
    "NetworkPolicy": "networking.k8s.io/v1/networkpolicies",
    "Event": "v1/events",
}


async def eventually(probe: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 30.0) -> Any:
    """Poll `probe` until it returns something truthy; that value. Fails saying `what` did not happen."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s} s (last: {last!r})")


def session_manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    body = {"model": {"path": "/models/tiny"}, "gpu": {"count": 0}, **spec}
    return {
        "apiVersion": GROUP_VERSION,
        "kind": defaults.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def _url(kind: str, namespace: str, name: str | None = None) -> str:
    group_version, plural = RESOURCES[kind].rsplit("/", 1)
    prefix = "api/v1" if group_version == "v1" else f"apis/{group_version}"
    base = f"/{prefix}/namespaces/{namespace}/{plural}"
    return f"{base}/{name}" if name else base


def chart_scope_values(scope: str, namespace: str) -> dict[str, Any]:
    """The chart values of a watch scope (`cluster` or `namespaces`, watching only `namespace`)."""
    if scope == "cluster":
        return {"watch.scope": "cluster"}
    return {"watch.scope": "namespaces", "watch.namespaces": [namespace]}


class EmulatorCluster:
    real = False

    def __init__(
        self,
        emulator: Emulator,
        url: str,
        namespace: str = "default",
        *,
        scope: str = "cluster",
        kubeconfig_dir: Path | None = None,
    ) -> None:
        self.emulator, self.api_server, self.namespace = emulator, url, namespace
        self.operator_args = (
            ["--standalone", "-A"] if scope == "cluster" else ["--standalone", "-n", namespace]
        )
        self.chart_values = chart_scope_values(scope, namespace)
        self.kubeconfig: str | None = None
        if kubeconfig_dir is not None:
            self.kubeconfig = str(kubeconfig_dir / "kubeconfig.yaml")
            write_kubeconfig(Path(self.kubeconfig), url, namespace)

    async def _call(self, method: str, path: str, body: Any = None, content_type: str | None = None) -> Any:
        headers = {"Content-Type": content_type} if content_type else None
        async with self.emulator.request(method, path, json=body, headers=headers) as response:
            data = await response.json()
            if response.status >= 400:
                raise RuntimeError(f"{method} {path}: {response.status} {data.get('message')}")
            return data

    async def create(self, obj: dict[str, Any]) -> None:
        await self._call("POST", _url(obj["kind"], self.namespace), obj)

    async def create_anywhere(self, obj: dict[str, Any]) -> None:
        """Create an object of any kind the emulator serves, at its own namespace or cluster-wide."""
        group_version, kind = obj["apiVersion"], obj["kind"]
        plural = kind.lower() + "s"
        prefix = "api/v1" if group_version == "v1" else f"apis/{group_version}"
        namespace = obj["metadata"].get("namespace")
        path = f"/{prefix}/namespaces/{namespace}/{plural}" if namespace else f"/{prefix}/{plural}"
        await self._call("POST", path, obj)

    async def patch(self, kind: str, name: str, patch: dict[str, Any], subresource: str = "") -> None:
        path = _url(kind, self.namespace, name) + (f"/{subresource}" if subresource else "")
        await self._call("PATCH", path, patch, "application/merge-patch+json")

    async def delete(self, kind: str, name: str) -> None:
        await self._call("DELETE", _url(kind, self.namespace, name))

    async def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.emulator.get(RESOURCES[kind], self.namespace, name)

    def get_now(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.emulator.get(RESOURCES[kind], self.namespace, name)

    async def events(self, name: str) -> list[dict[str, Any]]:
        return [
            dict(e)
            for (res, ns, _), obj in list(self.emulator.objects.items())
            if res.plural == "events" and ns == self.namespace and not obj.deleted
            for e in [obj.raw]
            if e.get("involvedObject", {}).get("name") == name
        ]

    async def mark_running(self, pod_name: str, *, vllm_ready: bool = True) -> bool:
        """Play the kubelet: the pod runs, vLLM (the sidecar) is ready or not, the trainer runs."""
        status = pod_running_status(vllm_ready=vllm_ready)
        await self.patch("Pod", pod_name, {"status": status}, subresource="status")
        return True


def write_kubeconfig(path: Path, server: str, namespace: str) -> None:
    """A kubeconfig without credentials for a test API server (the emulator serves plain http)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": {}}],
        "contexts": [
            {"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}
        ],
        "current-context": "test",
    }
    path.write_text(json.dumps(config))


def pod_running_status(*, vllm_ready: bool) -> dict[str, Any]:
    """What a kubelet reports for a running session pod: vLLM (the native sidecar) ready or not, the trainer up."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    running = {"running": {"startedAt": now}}
    return {
        "phase": "Running",
        "podIP": "127.0.0.1",
        "conditions": [{"type": "PodScheduled", "status": "True"}],
        "initContainerStatuses": [
            {"name": "vllm", "ready": vllm_ready, "restartCount": 0, "state": running, "image": "vllm",
             "imageID": ""}
        ],
        "containerStatuses": [
            {"name": "trainer", "ready": True, "restartCount": 0, "state": running, "image": "trainer",
             "imageID": ""}
        ],
    }  # fmt: skip


def kubectl_path() -> str | None:
    return shutil.which(
        "kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )


class KubectlCluster:
    """A real cluster through kubectl; the operator runs in-process with kopf's usual kubeconfig login."""

    real = True
    api_server = None

    def __init__(self, kubectl: str) -> None:
        self.kubectl = kubectl
        self.namespace = f"hogwild-e2e-{uuid.uuid4().hex[:6]}"
        self.operator_args = ["--standalone", "-n", self.namespace]
        # Namespace scope only: an operator under test must never act on sessions it did not create.
        self.chart_values = chart_scope_values("namespaces", self.namespace)
        self.kubeconfig = os.environ.get("KUBECONFIG")

    def _run(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.kubectl, *args], input=stdin, text=True, capture_output=True, check=check)

    async def setup(self, crd: Path) -> None:
        await asyncio.to_thread(self._run, "apply", "-f", str(crd))
        await asyncio.to_thread(self._run, "create", "namespace", self.namespace)

    async def teardown(self) -> None:
        await asyncio.to_thread(delete_namespace, self.kubectl, self.namespace)

    async def create(self, obj: dict[str, Any]) -> None:
        await asyncio.to_thread(self._run, "create", "-n", self.namespace, "-f", "-", stdin=json.dumps(obj))

    async def patch(self, kind: str, name: str, patch: dict[str, Any], subresource: str = "") -> None:
        extra = [f"--subresource={subresource}"] if subresource else []
        args = [
            "patch",
            "-n",
            self.namespace,
            kind.lower(),
            name,
            "--type=merge",
            "-p",
            json.dumps(patch),
            *extra,
        ]
        await asyncio.to_thread(self._run, *args)

    async def delete(self, kind: str, name: str) -> None:
        await asyncio.to_thread(self._run, "delete", "-n", self.namespace, kind.lower(), name, "--wait=false")

    def get_now(self, kind: str, name: str) -> dict[str, Any] | None:
        result = self._run("get", "-n", self.namespace, kind.lower(), name, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    async def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.get_now, kind, name)

    async def events(self, name: str) -> list[dict[str, Any]]:
        result = await asyncio.to_thread(
            self._run,
            "get",
            "events",
            "-n",
            self.namespace,
            f"--field-selector=involvedObject.name={name}",
            "-o",
            "json",
        )
        return list(json.loads(result.stdout)["items"])

    async def mark_running(self, pod_name: str, *, vllm_ready: bool = True) -> bool:
        """Play the kubelet where none runs the pod (it is not scheduled); False where a real one does."""
        pod = await self.get("Pod", pod_name)
        if pod is None or pod["spec"].get("nodeName"):
            return False
        status = pod_running_status(vllm_ready=vllm_ready)
        await self.patch("Pod", pod_name, {"status": status}, subresource="status")
        return True


def delete_namespace(kubectl: str, namespace: str, timeout_s: float = 120.0) -> None:
    """Delete a test namespace and wait until it is gone.

    The operator under test is stopped by now, so the sessions' finalizers would hold the namespace in
    `Terminating` forever: they are removed first (what the operator does after its final checkpoint)."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([kubectl, *args], text=True, capture_output=True, check=False)

    names = run("get", "trainingsessions", "-n", namespace, "-o", "name").stdout.split()
    for name in names:
        run("patch", "-n", namespace, name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    run("delete", "namespace", namespace, "--wait=false")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if run("get", "namespace", namespace).returncode != 0:
            return
        time.sleep(1)
    raise AssertionError(f"namespace {namespace} still exists {timeout_s:.0f} s after its delete")


def curve_keys(secret: dict[str, Any]) -> dict[str, bytes]:
    return {name: base64.b64decode(value) for name, value in secret["data"].items()}


class FakeWorker:
    """A stand-in for the training worker's control port: real ZMQ, real CURVE, the real protocol module."""

    def __init__(
        self,
        keys: dict[str, bytes],
        *,
        connected: bool = True,
        answer_checkpoints: bool = True,
        on_checkpoint: Callable[[str], None] | None = None,
        group: dict[str, Any] | None = None,
        knows_join: bool = True,
    ) -> None:
        self.connected, self.answer_checkpoints, self.on_checkpoint = (
            connected,
            answer_checkpoints,
            on_checkpoint,
        )
        # The replica group as a worker of a replicated session reports it (None: an older worker's reply).
        self.group = group
        self.knows_join = knows_join  # False: a worker image older than `join`
        self.config = TrainingConfig()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.step = 0
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.curve_server = True
        self._socket.curve_publickey = keys["server.public"]
        self._socket.curve_secretkey = keys["server.secret"]
        port = self._socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def kinds(self) -> list[str]:
        return [kind for kind, _ in list(self.requests)]

    def _answer(self, frame: bytes) -> bytes | None:
        try:
            request_id, request = decode_request(frame)
        except ProtocolError as err:
            return encode_error(request_id_of(frame), err)
        self.requests.append((request.type, request.to_body()))
        if isinstance(request, StatusRequest):
            self.step += 1
            reply = {
                "connected": self.connected,
                "paused": self.config.paused,
                "busy": False,
                "step": self.step,
                "tokens_trained": 100 * self.step,
                "loss": 2.0,
                "skipped_steps": 0,
                "last_checkpoint": None,
                "config": config_to_dict(self.config),
            }
            if self.group is not None:
                reply["group"] = dict(self.group)
            return encode_reply(request_id, reply)
        if isinstance(request, ConfigureRequest):
            self.config, reset = apply_changes(self.config, request.changes)
            return encode_reply(request_id, {"applied": sorted(request.changes), "state_reset": reset})
        if isinstance(request, CheckpointRequest):
            if self.on_checkpoint is not None:
                self.on_checkpoint(request.reason)
            if not self.answer_checkpoints:
                return None
            path = f"{defaults.CHECKPOINT_DIR}/step-{self.step:08d}"
            return encode_reply(request_id, {"step": self.step, "path": path, "reason": request.reason})
        if isinstance(request, JoinRequest) and not self.knows_join:
            return encode_error(request_id, ProtocolError("unknown_type", "unknown message type 'join'"))
        if isinstance(request, JoinRequest) and self.group is not None and self.group.get("state") == "alone":
            # A lone worker told to join: it reports the group it then forms with the others.
            self.group = {**self.group, "state": "formed", "replica": request.replica, "rank": request.replica,
                          "size": 2, "members": [0, 1], "epoch": 1, "in_sync": True, "digest": "d-1"}  # fmt: skip
            return encode_reply(request_id, {"joined": True, "group": self.group})
        return encode_error(request_id, ProtocolError("invalid", f"{request.type} is not served here"))

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(50):
                continue
            identity, *_, frame = self._socket.recv_multipart()
            reply = self._answer(frame)
            if reply is not None:
                self._socket.send_multipart([identity, b"", reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close(linger=0)
        self._context.term()


@contextlib.asynccontextmanager
async def run_operator(
    cluster: EmulatorCluster | KubectlCluster, *extra_args: str, **values: Any
) -> AsyncIterator[OperatorProcess]:
    """`hogwild operator` as the chart runs it (tests/operator_process.py), for the cluster's watch scope plus
    `values` (dotted chart paths) and `extra_args` after the short test intervals."""
    chart_values = {
        **cluster.chart_values,
        "operator.service.port": free_port(),
        "operator.logFormat": "plain",
        "operator.extraArgs": [*FAST_ARGS, *extra_args],
        **values,
    }
    process = await asyncio.to_thread(start_operator, cluster.namespace, chart_values, cluster.kubeconfig)
    try:
        if isinstance(cluster, EmulatorCluster):  # objects made before kopf watches would be missed
            emulator = cluster.emulator
            await eventually(
                lambda: resolved(emulator.watching("trainingsessions") or not process.alive()),
                "kopf watching",
            )
        assert process.alive(), f"hogwild operator exited:\n{process.log()[-4000:]}"
        yield process
    except BaseException:
        print(f"--- {' '.join(process.command)}\n{process.log()[-6000:]}")
        raise
    finally:
        await asyncio.to_thread(process.stop)


async def resolved(value: bool) -> bool:
    """`value`, awaitable (what `eventually` polls)."""
    return value


@contextlib.asynccontextmanager
async def open_cluster(kind: str, tmp_path: Path) -> AsyncIterator[EmulatorCluster | KubectlCluster]:
    """The cluster a flow runs against: `real` (the one KUBECONFIG names; skipped without it) or the emulator
    in a watch scope (`cluster`, `namespaces`). Every real-cluster variant tears down what it made."""
    import kmock
    import pytest

    if kind == "real":
        if not os.environ.get("KUBECONFIG"):
            pytest.skip("needs a real cluster: set KUBECONFIG; the emulator variants ran")
        kubectl = kubectl_path()
        if kubectl is None:
            pytest.skip("kubectl is not installed (scripts/install_tools.py installs it)")
        real = KubectlCluster(kubectl)
        await real.setup(CRD)
        try:
            yield real
        finally:
            await real.teardown()
        return
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        yield EmulatorCluster(emulator, str(server.url), scope=kind, kubeconfig_dir=tmp_path)
