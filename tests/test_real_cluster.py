"""The project on a real Kubernetes API server, the way a new user meets it (`-m e2e`, with KUBECONFIG set).

    KUBECONFIG=~/.kube/config python3 scripts/dev.py test -m e2e

runs these with the other real-cluster tests (CRD admission of every fixture, the operator flows). They need
an API server, RBAC and, for garbage collection, kube-controller-manager; no scheduler and no kubelet: the
operator runs here, on this machine, with exactly the command, args and env of the Deployment that `helm
install` created, and with that Deployment's ServiceAccount token, so RBAC is the chart's own. Every test
works in a namespace of its own and leaves nothing behind (sessions, release, namespace; none `Terminating`).
"""

from __future__ import annotations

import json
import os
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

ROOT = Path(__file__).resolve().parents[1]
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
    [("spec.gpu", "one GPU per session"), ("spec.training.eps", "at least 1e-30"), ("status.phase", "")],
    ids=["gpu", "eps", "phase"],
)
def test_kubectl_explain_shows_the_documented_fields(field: str, says: str) -> None:
    kubectl("apply", "--server-side=false", "-f", str(CRDS))
    text = kubectl("explain", f"trainingsessions.{field}").stdout
    assert "DESCRIPTION" in text and says in text


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


@pytest.mark.parametrize("scope", ["cluster", "namespaces"], ids=["default-cluster-scope", "namespace-scope"])
def test_helm_install_then_the_minimal_example_gets_its_pod(
    scope: str, namespace: str, tmp_path: Path
) -> None:
    """README's quick start: install the chart, apply examples/minimal.yaml, the session's pod appears."""
    if scope == "cluster" and (others := sessions_elsewhere(namespace)):
        pytest.skip(f"a cluster-scoped operator would act on sessions this test did not create: {others[:3]}")
    release = "hw"
    values: dict[str, Any] = {"operator.service.port": free_port()}
    if scope == "namespaces":
        values.update({"watch.scope": "namespaces", "watch.namespaces": [namespace]})
    installed = helm("install", release, CHART, "--namespace", namespace, *set_args(values))
    assert installed.returncode == 0, installed.stderr
    operator: OperatorProcess | None = None
    try:
        deployment = installed_operator(namespace, release)
        pod_spec = deployment["spec"]["template"]["spec"]
        (container,) = [c for c in pod_spec["containers"] if c["name"] == "operator"]
        kubeconfig = service_account_kubeconfig(namespace, pod_spec["serviceAccountName"], tmp_path / "sa")
        operator = OperatorProcess(
            command_line(container), {**literal_env(container), "KUBECONFIG": kubeconfig}
        )

        kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "minimal.yaml"))

        pod = until(
            lambda: kubectl("get", "pod", "-n", namespace, "qwen-chat", check=False).returncode == 0,
            "the session's pod",
            60,
        )
        assert pod
        status = until(lambda: session_status(namespace, "qwen-chat"), "the session's status", 60)
        assert status.get("podName") == "qwen-chat" and status.get("observedGeneration") == 1, status
        assert operator.alive(), operator.log()[-4000:]

        kubectl("delete", "trainingsession", "-n", namespace, "qwen-chat", "--wait=false")
        until(
            lambda: kubectl("get", "ts", "-n", namespace, "qwen-chat", check=False).returncode != 0,
            "the session gone (its worker never ran: nothing to wait for)",
            120,
        )
        log = operator.log()
        assert "Forbidden" not in log and " 403" not in log, "the chart's RBAC lacks a verb:\n" + log[-4000:]
    except BaseException:
        if operator is not None:
            print(operator.log()[-6000:])
        raise
    finally:
        if operator is not None:
            operator.stop()
        helm("uninstall", release, "--namespace", namespace)
