"""The Helm chart's monitoring objects and dashboards, rendered by the real helm binary.

The Prometheus Operator's kinds (ServiceMonitor, PodMonitor, PrometheusRule) have no offline schema, so their
structure is asserted here; the dashboards must reach Grafana's sidecar as the files the repository ships.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from chart_helpers import (
    CHART,
    MONITORING_APIS,
    MONITORING_KINDS,
    NAMESPACE,
    of_kind,
    one,
    rendered,
    rendered_text,
)

# --- monitoring objects (Prometheus Operator kinds: no offline schema, so checked here) --------------------


def test_servicemonitor_scrapes_the_operator_service_and_keeps_its_labels() -> None:
    docs = rendered("monitoring")
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    # The operator's series carry namespace/session labels of their own.
    assert endpoint["honorLabels"] is True


def test_podmonitor_scrapes_vllm_and_worker_ports_and_labels_the_session() -> None:
    monitor = one(rendered("monitoring"), "PodMonitor")
    assert monitor["spec"]["selector"] == {
        "matchLabels": {"app.kubernetes.io/name": "hogwild", "app.kubernetes.io/component": "session"}
    }
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [endpoint["port"] for endpoint in endpoints] == ["http", "metrics"]
    for endpoint in endpoints:
        assert endpoint["interval"] == "10s"
        assert {
            "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
            "targetLabel": "session",
        } in endpoint["relabelings"]
        assert {
            "sourceLabels": ["__meta_kubernetes_pod_label_hogwild_dev_replica"],
            "targetLabel": "replica",
        } in endpoint["relabelings"]


SESSION_SPECS = [
    pytest.param({"model": {"path": "/models/qwen"}}, id="device-plugin"),
    pytest.param({"model": {"path": "/models/tiny"}, "gpu": {"count": 0}}, id="cpu"),
    pytest.param(
        {"model": {"path": "/m"}, "gpu": {"sharing": "DRA", "claim": {"resourceClaimName": "gpu-0"}}},
        id="dra",
    ),
]


@pytest.mark.parametrize("spec", SESSION_SPECS)
def test_podmonitor_selects_the_pods_the_operator_builds(spec: dict[str, Any]) -> None:
    """The operator's real pod builder makes the pods; the PodMonitor must find them and their ports."""
    from hogwild.operator import builders, pod_builder
    from hogwild.operator.spec import parse_spec

    session = builders.SessionRef(name="qwen-chat", namespace="ml", uid="u-1")
    pod = pod_builder.build_pod(session, parse_spec(spec))
    monitor = one(rendered("monitoring"), "PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == session.name  # becomes `session`
    assert pod["metadata"]["labels"][builders.LABEL_REPLICA] == "0"  # becomes `replica`
    # Prometheus's name for a pod label: every character outside [a-zA-Z0-9_] becomes `_`.
    meta_label = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", builders.LABEL_REPLICA)
    for endpoint in monitor["podMetricsEndpoints"]:
        assert {"sourceLabels": [meta_label], "targetLabel": "replica"} in endpoint["relabelings"]
    containers = pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
    ports = {port["name"] for container in containers for port in container.get("ports", [])}
    assert {endpoint["port"] for endpoint in monitor["podMetricsEndpoints"]} <= ports


def test_operator_pods_are_not_selected_by_the_session_podmonitor() -> None:
    docs = rendered("monitoring")
    selector = one(docs, "PodMonitor")["spec"]["selector"]["matchLabels"]
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= labels.items()


@pytest.mark.parametrize(
    ("values", "expected"), [("default", {"any": True}), ("namespaced", {"matchNames": ["team-a", "team-b"]})]
)
def test_podmonitor_looks_where_sessions_live(values: str, expected: dict[str, Any]) -> None:
    monitor = one(rendered(values, "metrics.podMonitor.enabled=true"), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == expected


def test_prometheusrule_ships_the_promtool_tested_rules_file() -> None:
    rule = one(rendered("monitoring"), "PrometheusRule")
    shipped = yaml.safe_load((CHART / "rules" / "hogwild-alerts.yaml").read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert [group["name"] for group in rule["spec"]["groups"]] == [
        group["name"] for group in shipped["groups"]
    ]
    for rendered_group, shipped_group in zip(rule["spec"]["groups"], shipped["groups"], strict=True):
        for rendered_rule, shipped_rule in zip(rendered_group["rules"], shipped_group["rules"], strict=True):
            assert rendered_rule["labels"] == {"team": "ml-platform", **shipped_rule["labels"]}
            assert {**rendered_rule, "labels": None} == {**shipped_rule, "labels": None}


@pytest.mark.parametrize(
    ("values", "kinds"),
    [
        ("default", set()),
        ("monitoring", MONITORING_KINDS),
    ],
)
def test_monitoring_objects_only_when_enabled(values: str, kinds: set[str]) -> None:
    assert {doc["kind"] for doc in rendered(values)} & MONITORING_KINDS == kinds


# --- dashboards --------------------------------------------------------------------------------------------

DASHBOARDS = sorted(path.name for path in (CHART / "dashboards").glob("*.json"))


@pytest.mark.parametrize(
    ("apis", "kinds"),
    [
        ((), set()),
        (("monitoring.coreos.com/v1/PodMonitor",), {"PodMonitor"}),
        (MONITORING_APIS, MONITORING_KINDS),
    ],
    ids=["no-prometheus-operator", "podmonitor-only", "all"],
)
def test_monitoring_objects_only_where_the_cluster_has_their_kinds(
    apis: tuple[str, ...], kinds: set[str]
) -> None:
    """`helm install` must not fail with "no matches for kind" on a cluster without the Prometheus Operator."""
    docs = yaml.safe_load_all(rendered_text("monitoring", "1.35.0", api_versions=apis))
    assert {doc["kind"] for doc in docs if doc} & MONITORING_KINDS == kinds


def test_dashboards_exist() -> None:
    assert {"training.json", "interference.json", "operator.json"} <= set(DASHBOARDS)


@pytest.mark.parametrize(("values", "namespace"), [("default", NAMESPACE), ("monitoring", "monitoring")])
def test_dashboards_render_into_labelled_configmaps(values: str, namespace: str) -> None:
    maps = [
        doc
        for doc in of_kind(rendered(values), "ConfigMap")
        if "grafana_dashboard" in doc["metadata"]["labels"]
    ]
    shipped = {
        f"hogwild-{name}": json.loads((CHART / "dashboards" / name).read_text()) for name in DASHBOARDS
    }
    found = {}
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == namespace
        for key, text in config_map["data"].items():
            found[key] = json.loads(text)
    assert found == shipped


def test_dashboards_can_be_turned_off() -> None:
    assert not of_kind(rendered("custom"), "ConfigMap")


def test_dashboard_folder_annotation_is_passed_through() -> None:
    for config_map in of_kind(rendered("monitoring"), "ConfigMap"):
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "hogwild"}
