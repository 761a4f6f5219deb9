"""The Helm chart's fixtures and renderings, shared by test_chart.py and test_chart_monitoring.py.

helm and kubectl come from scripts/install_tools.py (pinned sha256), which scripts/dev.py runs.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "hogwild"
FIXTURES = ROOT / "tests" / "fixtures" / "helm"
VALUES_FILES = sorted(path.stem for path in FIXTURES.glob("*.yaml"))
CRD_NAME = "hogwild.dev_trainingsessions.yaml"
BIN = Path(sys.prefix) / "bin"
RELEASE, NAMESPACE = "hw-release", "hogwild-system"
# The chart's kubeVersion floor, and the newest release kubernetes-validate carries schemas for.
KUBE_VERSIONS = ["1.33.0", "1.37.0"]
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
# What a cluster with the Prometheus Operator serves (the chart creates its kinds only where they exist).
MONITORING_APIS = tuple(f"monitoring.coreos.com/v1/{kind}" for kind in sorted(MONITORING_KINDS))
# kopf's peering objects: their CRD (crds/kopf.dev_peerings.yaml) keeps any field, so there is nothing to check.
UNVALIDATED_KINDS = MONITORING_KINDS | {"ClusterKopfPeering", "KopfPeering"}


def tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{name} is missing from {BIN}: run `python3 scripts/dev.py venv` (install_tools.py)")
    return path


def helm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, check=False)


@functools.cache
def rendered_text(
    values: str, kube_version: str = "1.35.0", *sets: str, api_versions: tuple[str, ...] = MONITORING_APIS
) -> str:
    """`helm template` of a values fixture, for a cluster that serves `api_versions` (by default: with the
    Prometheus Operator's CRDs)."""
    set_args = [arg for item in sets for arg in ("--set", item)]
    api_args = [arg for api in api_versions for arg in ("--api-versions", api)]
    result = helm(
        "template", RELEASE, CHART, "--namespace", NAMESPACE, "--include-crds",
        "--kube-version", kube_version, "-f", FIXTURES / f"{values}.yaml", *set_args, *api_args,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(values: str, *sets: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered_text(values, "1.35.0", *sets)) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]
