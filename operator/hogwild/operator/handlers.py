"""kopf handlers: they only wire kopf's triggers to the Controller.

`build_operator(options)` returns a fresh registry and settings, so one process can run two operators
(the peering test does) and nothing lives in module globals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import kopf

from hogwild import defaults
from hogwild.operator.kube import Kube
from hogwild.operator.metrics import HealthServer, OperatorMetrics
from hogwild.operator.options import OperatorOptions
from hogwild.operator.reconcile import Controller
from hogwild.operator.relay import Relay

logger = logging.getLogger(__name__)
PLURAL = "trainingsessions"
FINALIZER = f"{defaults.API_GROUP}/finalizer"


@dataclass(frozen=True)
class Operator:
    registry: kopf.OperatorRegistry
    settings: kopf.OperatorSettings
    controller: Controller
    metrics: OperatorMetrics


def make_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # The CRD is installed before the operator (the chart's crds/), so one discovery at start-up suffices;
    # it also keeps the operator from needing list/watch on CRDs and namespaces.
    settings.scanning.disabled = True
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=defaults.API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=defaults.API_GROUP, key="last-handled-configuration"
    )
    # Our own events (phase changes, checkpoints, relays) say what happened; skip kopf's per-handler ones.
    settings.posting.level = logging.WARNING
    settings.peering.name = "hogwild"
    return settings


def post_event(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    kopf.event(cast(kopf.Body, body), type=kind, reason=reason, message=message)


def cluster_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """How the operator reaches a real cluster: its ServiceAccount in a pod, else the kubeconfig.

    A plain OperatorRegistry carries none of kopf's fallback logins, so without this the operator would only
    ever talk to the credential-less test API server.
    """
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def build_operator(options: OperatorOptions) -> Operator:
    registry = kopf.OperatorRegistry()
    settings = make_settings()
    metrics = OperatorMetrics()
    relay = Relay(metrics)
    controller = Controller(options, Kube(settings), relay, metrics, post_event)
    server = HealthServer(metrics, options.metrics_port) if options.metrics_port else None
    resource: dict[str, Any] = {
        "group": defaults.API_GROUP,
        "version": defaults.API_VERSION,
        "plural": PLURAL,
        "registry": registry,
    }

    @kopf.on.startup(registry=registry)
    async def start_health(**_: Any) -> None:
        if server is not None:
            await server.start()

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        await relay.close()
        if server is not None:
            await server.stop()

    if options.api_server:
        api_server = options.api_server

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=api_server, insecure=True, default_namespace="default")

    else:
        kopf.on.login(registry=registry)(cluster_login)

    async def on_change(body: kopf.Body, reason: str, patch: kopf.Patch, **_: Any) -> None:
        outcome = await controller.reconcile(body, str(reason), patch)
        if outcome.retry_after_s is not None:
            raise kopf.TemporaryError(outcome.message, delay=outcome.retry_after_s)

    kopf.on.create(**resource, id="reconcile")(on_change)
    kopf.on.resume(**resource, id="reconcile")(on_change)
    kopf.on.update(**resource, id="reconcile")(on_change)

    @kopf.timer(
        **resource, id="refresh", interval=options.status_interval_s, initial_delay=options.status_interval_s
    )
    async def refresh(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        await controller.reconcile(body, "timer", patch)

    @kopf.on.delete(**resource, id="finalize")
    async def finalize(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        await controller.finalize(body, patch)

    return Operator(registry=registry, settings=settings, controller=controller, metrics=metrics)
