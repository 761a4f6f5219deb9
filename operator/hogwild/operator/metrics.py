"""The operator's Prometheus metrics, and its `/metrics` + `/healthz` endpoint (port 8080 by default).

Every series carries `namespace` and `session`, so a dashboard can pick one session out of hundreds.
Each operator instance owns its registry (tests run two operators in one process).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp.web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hogwild.operator.status import PHASES

logger = logging.getLogger(__name__)

LABELS = ("namespace", "session")
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
RELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconciles = Counter(
            "hogwild_operator_reconcile",
            "Reconciles run, by what triggered them.",
            [*LABELS, "trigger"],
            registry=r,
        )
        self.reconcile_errors = Counter(
            "hogwild_operator_reconcile_errors",
            "Reconciles that ended in an error, by error kind.",
            [*LABELS, "error"],
            registry=r,
        )
        self.reconcile_seconds = Histogram(
            "hogwild_operator_reconcile_duration_seconds",
            "Wall time of one reconcile.",
            LABELS,
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.phase = Gauge(
            "hogwild_operator_session_phase",
            "1 for the session's current phase, 0 for the others.",
            [*LABELS, "phase"],
            registry=r,
        )
        self.relay_seconds = Histogram(
            "hogwild_operator_relay_duration_seconds",
            "Round trip of a request to the training worker.",
            [*LABELS, "request"],
            buckets=RELAY_BUCKETS,
            registry=r,
        )
        self.relay_errors = Counter(
            "hogwild_operator_relay_errors",
            "Requests to the worker that failed, by error code.",
            [*LABELS, "request", "code"],
            registry=r,
        )

        self.replicas = Gauge(
            "hogwild_operator_replicas",
            "The session's replicas: desired (spec.replicas), present (pods), ready (vLLM serving), in_sync "
            "(ready, with weights equal to the group's).",
            [*LABELS, "state"],
            registry=r,
        )
        self.replica_ready = Gauge(
            "hogwild_operator_replica_ready",
            "1 while this replica's vLLM serves (its pod is ready), else 0.",
            [*LABELS, "replica"],
            registry=r,
        )
        self.replica_in_sync = Gauge(
            "hogwild_operator_replica_in_sync",
            "1 while this replica's worker says its weights equal the group's, else 0 (unknown counts as 0).",
            [*LABELS, "replica"],
            registry=r,
        )

    def set_replicas(self, namespace: str, session: str, desired: int, status: Mapping[str, Any]) -> None:
        """From the status fields hogwild.operator.replicas computed; replicas that went lose their series."""
        counts = {
            "desired": desired,
            "present": status.get("replicas", 0),
            "ready": status.get("readyReplicas", 0),
            "in_sync": status.get("inSyncReplicas", 0),
        }
        for state, value in counts.items():
            self.replicas.labels(namespace, session, state).set(float(value))
        entries = {str(e["replica"]): e for e in status.get("replicaStatuses", [])}
        for metric in (self.replica_ready, self.replica_in_sync):
            for labels in list(_label_sets(metric)):
                if labels[:2] == (namespace, session) and labels[2] not in entries:
                    metric.remove(*labels)
        for replica, entry in entries.items():
            self.replica_ready.labels(namespace, session, replica).set(1.0 if entry.get("ready") else 0.0)
            in_sync = 1.0 if entry.get("inSync") is True else 0.0
            self.replica_in_sync.labels(namespace, session, replica).set(in_sync)

    def set_phase(self, namespace: str, session: str, phase: str) -> None:
        for candidate in PHASES:
            self.phase.labels(namespace, session, candidate).set(1.0 if candidate == phase else 0.0)

    def forget(self, namespace: str, session: str) -> None:
        """Drop a deleted session's series."""
        for metric in (
            self.reconciles,
            self.reconcile_errors,
            self.reconcile_seconds,
            self.phase,
            self.relay_seconds,
            self.relay_errors,
            self.replicas,
            self.replica_ready,
            self.replica_in_sync,
        ):
            for labels in list(_label_sets(metric)):
                if labels[:2] == (namespace, session):
                    metric.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _label_sets(metric: Counter | Gauge | Histogram) -> list[tuple[str, ...]]:
    # prometheus-client keeps children keyed by their label values.
    return list(getattr(metric, "_metrics", {}).keys())


class HealthServer:
    """`/metrics` and `/healthz` on the operator's event loop: if they answer, the loop is alive."""

    def __init__(self, metrics: OperatorMetrics, port: int, host: str = "0.0.0.0") -> None:
        self.metrics, self.port, self.host = metrics, port, host
        self._runner: aiohttp.web.AppRunner | None = None

    async def _metrics(self, _: aiohttp.web.Request) -> aiohttp.web.Response:
        body = self.metrics.render()
        return aiohttp.web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(text="ok\n")

    async def start(self) -> None:
        app = aiohttp.web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self._runner = aiohttp.web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        logger.info("operator metrics and health on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
