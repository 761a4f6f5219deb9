"""The project on a real Kubernetes API server, the way a new user meets it (`-m e2e`, with KUBECONFIG set).

    KUBECONFIG=~/.kube/config python3 scripts/dev.py test -m e2e

runs these with the other real-cluster tests (CRD admission of every fixture, the operator flows). They need
an API server, RBAC and, for garbage collection, kube-controller-manager; no scheduler and no kubelet: the
operator runs here, on this machine, with exactly the command, args and env of the Deployment that `helm
install` created, and with that Deployment's ServiceAccount token, so RBAC is the chart's own. Every test
works in a namespace of its own and leaves nothing behind (sessions, release, namespace; none `Terminating`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_helpers import CHART, helm, one
from operator_helpers import delete_namespace, kubectl_path
from operator_process import OperatorProcess, command_line, free_port, literal_env, set_args

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="needs a real cluster: set KUBECONFIG"),
]


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = kubectl_path()
    if binary is None:
        pytest.fail("kubectl is missing: run `python3 scripts/dev.py venv` (scripts/install_tools.py)")
    result = subprocess.run([binary, *args], input=stdin, text=True, capture_output=True, check=False)
    if check and result.returncode:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
    return result


def until(probe: Callable[[], Any], what: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := probe():
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"hogwild-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        delete_namespace(str(kubectl_path()), name)


def test_the_crds_apply_cleanly_client_and_server_side() -> None:
    """The API server checks each `default` against its CEL rules at CRD creation (it once refused gpu's)."""
    kubectl("apply", "--server-side=false", "-f", str(CRDS))
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/trainingsessions.hogwild.dev")


@pytest.mark.parametrize(
    ("field", "says"),
    [
        ("spec.gpu", "one GPU per session"),
        ("spec.training.eps", "at least 1e-30"),
        ("status.phase", ""),
        ("spec.replicas", "ReadWriteMany"),
        ("status.replicaStatuses", "ordinal"),
    ],
    ids=["gpu", "eps", "phase", "replicas", "replica-statuses"],
)
def test_kubectl_explain_shows_the_documented_fields(field: str, says: str) -> None:
    kubectl("apply", "--server-side=false", "-f", str(CRDS))
    text = kubectl("explain", f"trainingsessions.{field}").stdout
    # kubectl wraps a description at its own width: a phrase may break across lines.
    assert "DESCRIPTION" in text and says in " ".join(text.split())


def service_account_kubeconfig(namespace: str, account: str, path: Path) -> str:
    """A kubeconfig for the current cluster that authenticates as `account` (a short-lived token)."""
    token = kubectl("create", "token", "-n", namespace, account, "--duration=1h").stdout.strip()
    current = json.loads(kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json").stdout)
    cluster = current["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [
            {"name": "sa", "context": {"cluster": "cluster", "user": account, "namespace": namespace}}
        ],
        "current-context": "sa",
    }
    path.write_text(json.dumps(config))
    return str(path)


def installed_operator(namespace: str, release: str) -> dict[str, Any]:
    """The operator Deployment that the release created, as the API server stored it."""
    manifest = helm("get", "manifest", release, "--namespace", namespace)
    assert manifest.returncode == 0, manifest.stderr
    docs = [d for d in yaml.safe_load_all(manifest.stdout) if d]
    deployment = one(docs, "Deployment")
    stored = kubectl("get", "deployment", "-n", namespace, deployment["metadata"]["name"], "-o", "json")
    return dict(json.loads(stored.stdout))


def session_status(namespace: str, name: str) -> dict[str, Any]:
    found = kubectl("get", "trainingsession", "-n", namespace, name, "-o", "json", check=False)
    return dict(json.loads(found.stdout).get("status") or {}) if found.returncode == 0 else {}


def sessions_elsewhere(namespace: str) -> list[str]:
    listed = kubectl("get", "trainingsessions", "-A", "-o", "json", check=False)
    items = json.loads(listed.stdout).get("items", []) if listed.returncode == 0 else []
    return [
        f"{i['metadata']['namespace']}/{i['metadata']['name']}"
        for i in items
        if i["metadata"]["namespace"] != namespace
    ]


@contextlib.contextmanager
def chart_operators(
    namespace: str, tmp_path: Path, values: dict[str, Any]
) -> Iterator[list[OperatorProcess]]:
    """`helm install` into `namespace`, then the operator run here exactly as the release's Deployment runs it,
    once per Deployment replica, with its ServiceAccount's token (RBAC is the chart's own); uninstalled
    afterwards."""
    release = "hw"
    values = {"operator.service.port": free_port(), **values}
    installed = helm("install", release, CHART, "--namespace", namespace, *set_args(values))
    assert installed.returncode == 0, installed.stderr
    operators: list[OperatorProcess] = []
    try:
        deployment = installed_operator(namespace, release)
        pod_spec = deployment["spec"]["template"]["spec"]
        (container,) = [c for c in pod_spec["containers"] if c["name"] == "operator"]
        kubeconfig = service_account_kubeconfig(namespace, pod_spec["serviceAccountName"], tmp_path / "sa")
        env = {**literal_env(container), "KUBECONFIG": kubeconfig}
        for replica in range(deployment["spec"].get("replicas", 1)):
            command = command_line(container)
            if replica:  # each pod has an address of its own; here they share one host
                command = [
                    f"--metrics-port={free_port()}" if a.startswith("--metrics-port=") else a for a in command
                ]
            operators.append(OperatorProcess(command, env))
        yield operators
        for operator in operators:
            log = operator.log()
            assert "Forbidden" not in log and " 403" not in log, (
                "the chart's RBAC lacks a verb:\n" + log[-4000:]
            )
    except BaseException:
        for operator in operators:
            print(operator.log()[-6000:])
        raise
    finally:
        for operator in operators:
            operator.stop()
        helm("uninstall", release, "--namespace", namespace)


@contextlib.contextmanager
def chart_operator(namespace: str, tmp_path: Path, values: dict[str, Any]) -> Iterator[OperatorProcess]:
    """`chart_operators` with the chart's one replica."""
    with chart_operators(namespace, tmp_path, values) as (operator,):
        yield operator


def peers(namespace: str) -> dict[str, Any]:
    """The operators in the chart's namespaced KopfPeering (kopf keeps one status entry per live operator)."""
    found = kubectl("get", "kopfpeering", "-n", namespace, "hogwild", "-o", "json", check=False)
    return dict(json.loads(found.stdout).get("status") or {}) if found.returncode == 0 else {}


def exists(namespace: str, kind: str, name: str) -> bool:
    return kubectl("get", kind, "-n", namespace, name, check=False).returncode == 0


def absent(namespace: str, kind: str, name: str) -> bool:
    """Gone, or going (a pod on a node has a grace period; an unscheduled one goes at once)."""
    found = kubectl("get", kind, "-n", namespace, name, "-o", "json", check=False)
    return found.returncode != 0 or bool(json.loads(found.stdout)["metadata"].get("deletionTimestamp"))


@pytest.mark.parametrize("scope", ["cluster", "namespaces"], ids=["default-cluster-scope", "namespace-scope"])
def test_helm_install_then_the_minimal_example_gets_its_pod(
    scope: str, namespace: str, tmp_path: Path
) -> None:
    """README's quick start: install the chart, apply examples/minimal.yaml, the session's pod appears."""
    if scope == "cluster" and (others := sessions_elsewhere(namespace)):
        pytest.skip(f"a cluster-scoped operator would act on sessions this test did not create: {others[:3]}")
    values: dict[str, Any] = {}
    if scope == "namespaces":
        values.update({"watch.scope": "namespaces", "watch.namespaces": [namespace]})
    with chart_operator(namespace, tmp_path, values) as operator:
        kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "minimal.yaml"))

        pod = until(lambda: exists(namespace, "pod", "qwen-chat"), "the session's pod", 60)
        assert pod
        status = until(lambda: session_status(namespace, "qwen-chat"), "the session's status", 60)
        assert status.get("podName") == "qwen-chat" and status.get("observedGeneration") == 1, status
        assert operator.alive(), operator.log()[-4000:]

        kubectl("delete", "trainingsession", "-n", namespace, "qwen-chat", "--wait=false")
        until(
            lambda: not exists(namespace, "ts", "qwen-chat"),
            "the session gone (its worker never ran: nothing to wait for)",
            120,
        )


def test_replicas_example_gets_its_replicas_budget_and_headless_service_then_scales_down(
    namespace: str, tmp_path: Path
) -> None:
    """examples/replicas.yaml on a real API server under the chart's RBAC: three replica pods (their
    hostname, subdomain and spread accepted), a PodDisruptionBudget, the headless Service; then
    `kubectl scale` (the scale subresource) to one replica removes the others and the budget."""
    values = {"watch.scope": "namespaces", "watch.namespaces": [namespace]}
    with chart_operator(namespace, tmp_path, values) as operator:
        kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "replicas.yaml"))
        for name in ("qwen-chat", "qwen-chat-1", "qwen-chat-2"):
            until(lambda n=name: exists(namespace, "pod", n), f"replica pod {name}", 60)
        until(lambda: exists(namespace, "poddisruptionbudget", "qwen-chat"), "the budget", 60)
        headless = json.loads(
            kubectl("get", "service", "-n", namespace, "qwen-chat-replicas", "-o", "json").stdout
        )
        assert (
            headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
        )
        pod = json.loads(kubectl("get", "pod", "-n", namespace, "qwen-chat-2", "-o", "json").stdout)
        assert (pod["spec"]["hostname"], pod["spec"]["subdomain"]) == ("replica-2", "qwen-chat-replicas")
        status = until(
            lambda: (s := session_status(namespace, "qwen-chat")).get("replicas") == 3 and s,
            "status.replicas 3",
            60,
        )
        assert [e["replica"] for e in status["replicaStatuses"]] == [0, 1, 2]
        columns = kubectl("get", "ts", "-n", namespace, "qwen-chat").stdout.splitlines()[0].split()
        assert {"READY", "DESIRED", "IN"} <= set(columns), columns

        kubectl("scale", "ts", "-n", namespace, "qwen-chat", "--replicas", "1")
        for name in ("qwen-chat-2", "qwen-chat-1"):
            until(lambda n=name: absent(namespace, "pod", n), f"replica pod {name} removed", 60)
        until(lambda: absent(namespace, "poddisruptionbudget", "qwen-chat"), "the budget removed", 60)
        assert exists(namespace, "pod", "qwen-chat"), "replica 0 stays"
        assert operator.alive(), operator.log()[-4000:]
        kubectl("delete", "trainingsession", "-n", namespace, "qwen-chat", "--wait=false")
        until(lambda: not exists(namespace, "ts", "qwen-chat"), "the session gone", 120)


def test_two_chart_replicas_with_peering_one_acts_then_the_other_takes_over(
    namespace: str, tmp_path: Path
) -> None:
    """`operator.replicas: 2` with peering (values.yaml's way to run a standby): the chart's peering CRD and
    KopfPeering, two copies of its Deployment's command under its RBAC. Each picks a random priority, so one
    acts and the other stays paused (kopf starts paused: a replica that never acted logs no 'Pausing'); when
    the active one stops, the standby makes the next session's pod."""
    values = {
        "watch.scope": "namespaces",
        "watch.namespaces": [namespace],
        "operator.replicas": 2,
        "operator.peering.enabled": True,
    }
    with chart_operators(namespace, tmp_path, values) as operators:
        assert len(operators) == 2
        until(lambda: len(peers(namespace)) == 2, "both replicas in the KopfPeering", 60)
        kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "minimal.yaml"))
        until(lambda: exists(namespace, "pod", "qwen-chat"), "the session's pod", 60)
        status = until(lambda: session_status(namespace, "qwen-chat"), "the session's status", 60)
        assert status.get("observedGeneration") == 1, status
        (active,) = until(lambda: [o for o in operators if "qwen-chat" in o.log()], "the acting replica", 30)
        (standby,) = [o for o in operators if o is not active]
        assert "qwen-chat" not in standby.log(), "both replicas acted:\n" + standby.log()[-4000:]

        active.process.send_signal(signal.SIGTERM)  # kopf stops gracefully and clears its peering entry
        active.process.wait(30)
        second = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())
        second["metadata"]["name"] = "qwen-chat-two"
        kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(second))
        until(lambda: exists(namespace, "pod", "qwen-chat-two"), "the standby making the next pod", 90)
        assert standby.alive(), standby.log()[-4000:]
        for name in ("qwen-chat", "qwen-chat-two"):
            kubectl("delete", "trainingsession", "-n", namespace, name, "--wait=false")
        until(
            lambda: not kubectl("get", "ts", "-n", namespace, "-o", "name").stdout.strip(),
            "sessions gone",
            120,
        )
