"""The Grafana dashboards (charts/hogwild/dashboards/*.json), checked as JSON: no Grafana server exists here.

They must import anywhere: the datasource is the `${DS_PROMETHEUS}` variable, never a hard-coded uid; a
TrainingSession variable picks sessions; and every metric a query names is one that hogwild or vLLM really
exports (tests/monitoring_helpers.py reads the names from the real metric classes and vLLM's source).
test_prometheus.py runs the same queries against a real Prometheus.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from monitoring_helpers import (
    DATASOURCE,
    dashboard,
    dashboard_names,
    known_metric_names,
    metric_names,
    panel_queries,
    project_metric_names,
    selectors,
    split_label_values,
    variable_queries,
    vllm_metric_names,
)

DASHBOARDS = dashboard_names()
QUERIES = [query for name in DASHBOARDS for query in panel_queries(name)]


def walk(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path, key, value) of every key in a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}[{index}]")


def test_the_three_dashboards_exist() -> None:
    assert DASHBOARDS == ["interference", "operator", "training"]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_datasource_is_the_ds_prometheus_variable(name: str) -> None:
    variables = {v["name"]: v for v in dashboard(name)["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    for path, key, value in walk(dashboard(name)):
        if key == "datasource":
            assert value == DATASOURCE, f"{path}: {value}"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_no_hard_coded_uids(name: str) -> None:
    """The dashboard's own uid (stable links) is the only uid that is not the datasource variable."""
    uids = [(path, value) for path, key, value in walk(dashboard(name)) if key == "uid"]
    assert ("", f"hogwild-{name}") in uids
    assert all(value == "${DS_PROMETHEUS}" for path, value in uids if path), uids


@pytest.mark.parametrize("name", DASHBOARDS)
def test_has_namespace_and_trainingsession_variables(name: str) -> None:
    variables = {v["name"]: v for v in dashboard(name)["templating"]["list"]}
    session = variables["session"]
    assert session["label"] == "TrainingSession"
    assert session["multi"] and session["includeAll"] and session["allValue"] == ".*"
    assert split_label_values(variable_queries(name)["session"])[1] == "session"
    assert split_label_values(variable_queries(name)["namespace"])[1] == "namespace"
    assert '$namespace"' in variable_queries(name)["session"], "the session list must follow the namespace"


@pytest.mark.parametrize("query", QUERIES, ids=[query.id for query in QUERIES])
def test_every_query_filters_by_namespace_and_session(query: Any) -> None:
    found = list(selectors(query.expr))
    assert found, query.expr
    for body in found:
        assert 'namespace=~"$namespace"' in body and 'session=~"$session"' in body, query.expr


@pytest.mark.parametrize("query", QUERIES, ids=[query.id for query in QUERIES])
def test_every_query_names_exported_metrics(query: Any) -> None:
    names = metric_names(query.expr)
    assert names, f"no metric found in {query.expr}"
    unknown = names - known_metric_names()
    assert not unknown, f"{query.id} names metrics nobody exports: {sorted(unknown)}"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_variable_queries_name_exported_metrics(name: str) -> None:
    for variable, query in variable_queries(name).items():
        selector, _ = split_label_values(query)
        assert metric_names(selector) <= project_metric_names(), f"{variable}: {query}"


# What the issue asks each dashboard to show, as the metrics its queries must use.
REQUIRED_METRICS = [
    pytest.param(
        "training",
        {
            "hogwild_worker_loss",
            "hogwild_worker_tokens_total",
            "hogwild_worker_step_seconds_bucket",
            "hogwild_worker_grad_norm",
            "hogwild_worker_update_norm",
            "hogwild_worker_skipped_steps_total",
            "hogwild_worker_optimizer_state_bytes",
            "hogwild_worker_last_checkpoint_timestamp",
            "hogwild_worker_checkpoint_interval_seconds",
            "hogwild_worker_unsaved_since_timestamp_seconds",
            # safe online learning: version over time, evaluations, reverts, rollbacks
            "hogwild_worker_weights_step",
            "hogwild_worker_evaluations_total",
            "hogwild_worker_reverts_total",
            "hogwild_worker_rollbacks_total",
            # replicas (issue 17): ready and in sync, the group's size and epoch, the all-reduce's cost
            "hogwild_operator_replicas",
            "hogwild_worker_group_size",
            "hogwild_worker_group_epoch",
            "hogwild_worker_group_in_sync",
            "hogwild_worker_allreduce_seconds_bucket",
        },
        id="training",
    ),
    pytest.param(
        "interference",
        {
            "vllm:num_requests_running",
            "vllm:e2e_request_latency_seconds_bucket",
            "vllm:inter_token_latency_seconds_bucket",
            "vllm:generation_tokens_total",
            "hogwild_worker_tokens_total",
            "hogwild_worker_busy",
            "hogwild_worker_training_share",
            "hogwild_worker_training_share_floor",
        },
        id="interference",
    ),
    pytest.param(
        "operator",
        {
            "hogwild_operator_session_phase",
            "hogwild_operator_reconcile_total",
            "hogwild_operator_reconcile_errors_total",
            "hogwild_operator_reconcile_duration_seconds_bucket",
            "hogwild_operator_relay_duration_seconds_bucket",
        },
        id="operator",
    ),
]


@pytest.mark.parametrize(("name", "required"), REQUIRED_METRICS)
def test_dashboard_shows_what_the_issue_asks(name: str, required: set[str]) -> None:
    used = set().union(*(metric_names(query.expr) for query in panel_queries(name)))
    assert required <= used, f"missing: {sorted(required - used)}"


# Series scraped from session pods carry `replica` (the PodMonitor copies the pod's hogwild.dev/replica label).
POD_SERIES = ("hogwild_worker_", "vllm:")
PER_REPLICA = [
    pytest.param(name, panel["title"], target, id=f"{name}/{panel['title']}/{target['refId']}")
    for name in ("training", "interference")
    for panel in dashboard(name)["panels"]
    for target in panel.get("targets", [])
    if all(metric.startswith(POD_SERIES) for metric in metric_names(target["expr"]))
]


@pytest.mark.parametrize(("name", "title", "target"), PER_REPLICA)
def test_pod_series_are_drawn_per_replica(name: str, title: str, target: dict[str, Any]) -> None:
    """A session's replicas are separate lines: every aggregation keeps `replica`, every legend names it."""
    for grouping in re.findall(r"by \(([^)]*)\)", target["expr"]):
        assert "replica" in [label.strip() for label in grouping.split(",")], target["expr"]
    assert "{{replica}}" in target["legendFormat"], f"{title}: {target['legendFormat']}"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_panels_are_well_formed(name: str) -> None:
    panels = dashboard(name)["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the grid"
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel.get("description"), f"{panel['title']} has no description"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_dashboard_uids_are_unique() -> None:
    uids = [dashboard(name)["uid"] for name in DASHBOARDS]
    assert len(set(uids)) == len(uids)


# The name readers themselves: a reader that finds nothing would let every check above pass vacuously.
READER_CASES = [
    pytest.param(
        'sum by (session) (rate(hogwild_worker_steps_total{namespace=~"$namespace"}[$__rate_interval]))',
        {"hogwild_worker_steps_total"},
        id="rate-by",
    ),
    pytest.param(
        "histogram_quantile(0.95, sum by (session, le) (rate(vllm:e2e_request_latency_seconds_bucket[5m])))",
        {"vllm:e2e_request_latency_seconds_bucket"},
        id="quantile-colon-name",
    ),
    pytest.param('time() - last_ts{a="b"} < 1e9', {"last_ts"}, id="time-and-exponent"),
    pytest.param(
        "a > 1.5 * b offset 1h and on (namespace, session) c == bool 0", {"a", "b", "c"}, id="offset-and-on"
    ),
    pytest.param('count by (phase) (x{phase=~"Training|Paused"} == 1)', {"x"}, id="count"),
]


@pytest.mark.parametrize(("expr", "expected"), READER_CASES)
def test_metric_name_reader(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_vllm_names_are_read_from_its_source() -> None:
    names = vllm_metric_names()
    assert {
        "vllm:num_requests_running",
        "vllm:generation_tokens_total",
        "vllm:e2e_request_latency_seconds_bucket",
    } <= names
    assert len(names) > 40


def test_project_names_come_from_the_real_metric_classes() -> None:
    names = project_metric_names()
    assert {
        "hogwild_worker_steps_total",
        "hogwild_worker_connected",
        "hogwild_operator_session_phase",
    } <= names
