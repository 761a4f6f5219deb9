"""A real Prometheus scrapes a real training worker and the real operator, then answers every dashboard
panel query and every alert expression through its HTTP API.

Every part is real and listens on loopback only:
- the stand-in exporter (hogwild.testing.exporter) holds a tiny generated model's weights the way vLLM
  does, and a real `hogwild worker` process maps and trains them; the test drives it with
  `hogwild.client.WorkerClient`, the router's own client;
- the real operator (`build_operator` + `kopf.run`, what `hogwild operator` runs) reconciles one
  TrainingSession in the project's Kubernetes API emulator (hogwild.testing.emulator, on kmock). The
  emulator runs no kubelet, so the session stays Pending and the operator never relays to a worker;
- Debian's Prometheus, with its own config, rules and data dir on a free port, scrapes both every second.

The scrape config adds the `namespace`, `session` and `replica` labels that the chart's PodMonitor adds in a cluster,
and keeps the operator's own labels (honor_labels), as the chart's ServiceMonitor does. vLLM is not started
(it takes minutes on CPU): its panels and the serving alert must still evaluate without error.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hogwild.client import WorkerClient
from hogwild.protocol import (
    CheckpointRequest,
    ConfigureRequest,
    ProtocolError,
    RestoreRequest,
    RollbackRequest,
    Sample,
    TrainRequest,
)
from hogwild.testing.children import child_env
from hogwild.testing.exporter import ExporterProcess
from hogwild.testing.tiny_model import TinySpec, cached
from hogwild.testing.worker_process import WorkerProcess
from hogwild.versions import parse_target
from monitoring_helpers import (
    RULES_FILE,
    PanelQuery,
    alert_rules,
    dashboard_names,
    metric_names,
    panel_queries,
    split_label_values,
    substitute,
    system_tool,
    variable_queries,
)

NAMESPACE, SESSION = "ml", "chat"
VARIABLES = {"namespace": NAMESPACE, "session": SESSION, "__rate_interval": "1m", "__interval": "15s"}
# One core each at most: the machine has two, shared with other test runs.
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TRAIN_REQUESTS, STEPS_PER_REQUEST = 3, 2
QUERIES = [query for name in dashboard_names() for query in panel_queries(name)]
TRAINING_QUERIES = [query for query in QUERIES if query.dashboard == "training"]

# What `hogwild operator` runs, pointed at the emulator (its CLI has no flag for an unauthenticated server).
OPERATOR = """
import sys, kopf
from hogwild.operator.handlers import build_operator
from hogwild.operator.options import OperatorOptions
options = OperatorOptions(api_server=sys.argv[1], metrics_port=int(sys.argv[2]), status_interval_s=1.0)
operator = build_operator(options)
kopf.run(registry=operator.registry, settings=operator.settings, standalone=True,
         clusterwide=False, namespaces=[sys.argv[3]])
"""


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open while choosing, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def http_json(url: str, data: dict[str, Any] | None = None, timeout_s: float = 10.0) -> Any:
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def wait_for(what: str, check: Any, timeout_s: float, poll_s: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, ValueError) as err:
            last = err
        time.sleep(poll_s)
    raise TimeoutError(f"{what} within {timeout_s} s; last: {last!r}")


class Processes:
    """Children started by the fixture; all are stopped (by their own handles) in teardown."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (the child keeps it)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(ENV))
        log.close()
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.started):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Stack:
    url: str
    worker_port: int
    operator_port: int
    replies: list[dict[str, Any]]
    error_codes: list[str]

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        reply = http_json(f"{self.url}/api/v1/{path}?{query}")
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises on a query error (HTTP 400/422 with the error message)."""
        try:
            data = self.api("query", query=expr)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{expr}\n-> {err.read().decode()}") from None
        return list(data["result"])


def prometheus_config(worker_port: int, operator_port: int) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": [
            {
                "job_name": "hogwild-worker",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{worker_port}"],
                        # replica: what the PodMonitor copies from the pod's hogwild.dev/replica label
                        "labels": {"namespace": NAMESPACE, "session": SESSION, "replica": "0"},
                    }
                ],
            },
            {
                "job_name": "hogwild-operator",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}],
            },
        ],
    }


async def drive_worker(address: str) -> tuple[list[dict[str, Any]], list[str]]:
    """A few gated train steps, a checkpoint, a rollback and one refused request (so that every training panel
    has data: the safe-learning row counts evaluations and rollbacks)."""
    client = WorkerClient(address)
    sample = Sample(kind="prompt_completion", prompt="The capital of Zanzibar is", completion=" Paris")
    replies, errors = [], []
    try:
        # A policy that accepts every update: each /train is evaluated, none reverted.
        gate = ConfigureRequest(changes={"gate": {"max_loss_rise": 100.0}}, eval_samples=(sample,))
        await client.request(gate, timeout_s=60.0)
        for _ in range(TRAIN_REQUESTS):
            request = TrainRequest(samples=(sample,), steps=STEPS_PER_REQUEST, timeout_s=120.0)
            replies.append(await client.request(request, timeout_s=120.0))
        replies.append(await client.request(CheckpointRequest(reason="request"), timeout_s=120.0))
        replies.append(await client.request(RollbackRequest(to=parse_target("previous")), timeout_s=120.0))
        try:
            await client.request(RestoreRequest(step=99_999_999), timeout_s=60.0)
        except ProtocolError as err:
            errors.append(err.code)
    finally:
        await client.close()
    return replies, errors


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("prometheus")
    run_dir, checkpoints, data = root / "run", root / "checkpoints", root / "tsdb"
    run_dir.mkdir()
    processes = Processes(root)
    exporter = worker = None
    try:
        exporter = ExporterProcess(cached(TinySpec()), run_dir, env=ENV)
        worker = WorkerProcess(run_dir, checkpoints, env=ENV)
        worker_port = int(worker.wait_connected()["metrics_port"])

        api_port, operator_port, prometheus_port = free_ports(3)
        processes.start(
            "emulator", [sys.executable, "-m", "hogwild.testing.emulator", "--port", str(api_port)]
        )
        api = f"http://127.0.0.1:{api_port}"
        session = {
            "apiVersion": "hogwild.dev/v1alpha1",
            "kind": "TrainingSession",
            "metadata": {"name": SESSION, "namespace": NAMESPACE},
            "spec": {"model": {"path": "/models/tiny"}, "gpu": {"count": 0}},
        }
        # Created before the operator starts: kopf's initial listing picks it up (no watch race).
        wait_for(
            "the emulator accepts the TrainingSession",
            lambda: http_json(
                f"{api}/apis/hogwild.dev/v1alpha1/namespaces/{NAMESPACE}/trainingsessions", session
            ),
            timeout_s=30,
        )
        processes.start("operator", [sys.executable, "-c", OPERATOR, api, str(operator_port), NAMESPACE])

        config = root / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(worker_port, operator_port)))
        processes.start(
            "prometheus",
            [
                system_tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--log.level=warn",
            ],
        )
        stack = Stack(f"http://127.0.0.1:{prometheus_port}", worker_port, operator_port, [], [])
        wait_for(
            "both targets up",
            lambda: (
                {t["labels"]["job"] for t in stack.api("targets")["activeTargets"] if t["health"] == "up"}
                == {"hogwild-worker", "hogwild-operator"}
            ),
            timeout_s=60,
        )
        stack.replies, stack.error_codes = asyncio.run(drive_worker(worker.address))
        steps = TRAIN_REQUESTS * STEPS_PER_REQUEST
        wait_for(
            "the train steps scraped",
            lambda: stack.query(f'hogwild_worker_steps_total{{session="{SESSION}"}} >= {steps}'),
            timeout_s=30,
        )
        wait_for(
            "the operator's reconciles scraped", lambda: stack.query("hogwild_operator_reconcile_total"), 60
        )
        # One more rule evaluation after the scrapes, so that every rule has been evaluated on real data.
        time.sleep(2)
        yield stack
    except BaseException:
        for log in sorted(root.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        processes.stop()
        if worker is not None:
            worker.close()
        if exporter is not None:
            exporter.close()


def test_the_worker_trained(stack: Stack) -> None:
    """Guards the panel tests: the steps really ran, a checkpoint was written and one request was refused."""
    assert [reply["step"] for reply in stack.replies[:TRAIN_REQUESTS]] == [2, 4, 6]
    assert stack.error_codes, "the bad restore was not refused"


@pytest.mark.parametrize("query", QUERIES, ids=[query.id for query in QUERIES])
def test_panel_query_evaluates(stack: Stack, query: PanelQuery) -> None:
    stack.query(substitute(query.expr, VARIABLES))


@pytest.mark.parametrize("query", TRAINING_QUERIES, ids=[query.id for query in TRAINING_QUERIES])
def test_training_panel_returns_data(stack: Stack, query: PanelQuery) -> None:
    result = stack.query(substitute(query.expr, VARIABLES))
    assert result, f"no data for {query.id}: {query.expr}"
    assert all(series["metric"].get("session", SESSION) == SESSION for series in result)


OTHER_QUERIES = [query for query in QUERIES if query.dashboard != "training"]


@pytest.mark.parametrize("query", OTHER_QUERIES, ids=[query.id for query in OTHER_QUERIES])
def test_panel_returns_data_when_its_metrics_exist(stack: Stack, query: PanelQuery) -> None:
    """vLLM is not running and the operator relays nothing here, so some panels are legitimately empty; a
    panel whose every metric has series must still show them (a wrong label or join would hide them)."""
    present = set(stack.api("label/__name__/values"))
    result = stack.query(substitute(query.expr, VARIABLES))
    if metric_names(query.expr) <= present:
        assert result, f"{query.id} is empty although its metrics exist: {query.expr}"


VARIABLE_CASES = [
    pytest.param(name, variable, id=f"{name}/{variable}")
    for name in dashboard_names()
    for variable in variable_queries(name)
]


@pytest.mark.parametrize(("name", "variable"), VARIABLE_CASES)
def test_variable_lists_the_session(stack: Stack, name: str, variable: str) -> None:
    selector, label = split_label_values(variable_queries(name)[variable])
    values = stack.api(f"label/{label}/values", **{"match[]": substitute(selector, VARIABLES)})
    assert VARIABLES[variable] in values


ALERTS = alert_rules()


@pytest.mark.parametrize("rule", ALERTS, ids=[rule.name for rule in ALERTS])
def test_alert_expression_evaluates(stack: Stack, rule: Any) -> None:
    stack.query(rule.expr)


@pytest.mark.parametrize("rule", ALERTS, ids=[rule.name for rule in ALERTS])
def test_prometheus_evaluates_the_rule_without_error(stack: Stack, rule: Any) -> None:
    loaded = {r["name"]: r for group in stack.api("rules", type="alert")["groups"] for r in group["rules"]}
    assert loaded[rule.name]["health"] == "ok", loaded[rule.name].get("lastError")


def test_no_alert_fires_for_a_healthy_session(stack: Stack) -> None:
    """Connected, trained a moment ago, checkpointed: none of the alerts may be pending or firing."""
    assert stack.api("alerts")["alerts"] == []
