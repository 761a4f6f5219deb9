"""`hogwild operator` as users run it: the command, args and env of the chart's rendered Deployment.

The operator flow tests start the product's own entry point in a child process, with exactly what `helm
template` renders for the values a test gives (watch scope, peering, metrics port, `operator.extraArgs` for
the short test intervals), and reach the cluster through a kubeconfig, as a user's operator does: the kmock
emulator's URL for the emulator, the user's `KUBECONFIG` for a real cluster. Starting the operator through
kopf's own runner instead once hid that the chart's default args made it handle nothing.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from chart_helpers import CHART, RELEASE, helm, of_kind, one
from hogwild.testing.children import child_env

KUBE_VERSION = "1.35.0"
# Short intervals for tests, given the way users give any extra flag: the chart's `operator.extraArgs`.
FAST_ARGS = (
    "--status-interval=0.3",
    "--status-timeout=1",
    "--configure-timeout=5",
    "--restart-poll=0.2",
    "--allow-worker-address-override",
)


def set_args(values: Mapping[str, Any]) -> list[str]:
    """`--set-json` arguments for a flat mapping of dotted value paths."""
    return [arg for key, value in values.items() for arg in ("--set-json", f"{key}={json.dumps(value)}")]


def render_chart(namespace: str, values: Mapping[str, Any]) -> list[dict[str, Any]]:
    result = helm(
        "template",
        RELEASE,
        CHART,
        "--namespace",
        namespace,
        "--kube-version",
        KUBE_VERSION,
        *set_args(values),
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def operator_container(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(list(docs), "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return dict(next(c for c in containers if c["name"] == "operator"))


def command_line(container: Mapping[str, Any]) -> list[str]:
    """The container's command and args, with `hogwild` resolved to this venv's console script."""
    command = [*container["command"], *container.get("args", [])]
    if command[0] == "hogwild":
        command[0] = str(Path(sys.executable).parent / "hogwild")
    return command


def literal_env(container: Mapping[str, Any]) -> dict[str, str]:
    """The container's env with literal values (the downward-API ones need a pod)."""
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def peering_objects(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return of_kind(list(docs), "ClusterKopfPeering") + of_kind(list(docs), "KopfPeering")


class OperatorProcess:
    """One `hogwild operator` child; its log goes to a temporary file, shown when a test fails."""

    def __init__(self, command: list[str], env: Mapping[str, str]) -> None:
        self.command = command
        self.log_path = Path(tempfile.mkstemp(prefix="hogwild-operator-", suffix=".log")[1])
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                command, env=child_env(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (kopf stops gracefully), then SIGKILL; the exit code. The log file is removed."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        code = self.process.wait()
        self.log_path.unlink(missing_ok=True)
        return code


def start_operator(namespace: str, values: Mapping[str, Any], kubeconfig: str | None) -> OperatorProcess:
    """Start the chart's operator command for `values` (the caller stops it)."""
    container = operator_container(render_chart(namespace, values))
    env = {**literal_env(container), "PYTHONUNBUFFERED": "1"}
    if kubeconfig is not None:
        env["KUBECONFIG"] = kubeconfig
    return OperatorProcess(command_line(container), env)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
