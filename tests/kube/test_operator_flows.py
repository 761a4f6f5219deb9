"""The operator end to end: the product's `hogwild operator`, started with the args the chart renders, against
kopf's kmock emulator or a real cluster, through the flows a user drives.

create, hot update (relayed to a real `hogwild worker` over ZMQ+CURVE), restart-requiring update (checkpoint
first, then a new pod), operator restart (no duplicates), delete with the finalizer (final checkpoint, with a
timeout), an invalid spec, peering (two operators never both act), and the operator's /metrics.

Each flow takes a `cluster`: the emulator in both watch scopes (`watch.scope: cluster` renders
`--all-namespaces`, `namespaces` renders `--namespace=...`), or a real cluster when KUBECONFIG is set (`e2e`;
namespace scope only, so that a test never acts on sessions it did not create). The operator is a child
process running exactly the chart's command, args and env (tests/operator_process.py); the short test
intervals travel as `operator.extraArgs`, the way a user passes any flag. The worker address is redirected
with the `hogwild.dev/worker-address` annotation, which only `--allow-worker-address-override` honours.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hogwild.operator import builders, pod_builder
from operator_helpers import (
    EmulatorCluster,
    FakeWorker,
    KubectlCluster,
    curve_keys,
    eventually,
    open_cluster,
    resolved,
    run_operator,
    session_manifest,
)
from operator_process import (
    free_port,
    peering_objects,
    render_chart,
)

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "hogwild.dev_trainingsessions.yaml"
pytestmark = pytest.mark.timeout(180)
Cluster = EmulatorCluster | KubectlCluster


@pytest.fixture(
    params=["cluster", "namespaces", pytest.param("real", marks=pytest.mark.e2e)],
    ids=["emulator-cluster-scope", "emulator-namespace-scope", "real"],
)
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Both watch scopes here (kube/conftest.py's `cluster` has one): the flows are what the scopes change."""
    async with open_cluster(request.param, tmp_path) as opened:
        yield opened


operator = run_operator


async def status_of(cluster: Cluster, name: str) -> dict[str, Any]:
    found = await cluster.get("TrainingSession", name)
    return dict((found or {}).get("status") or {})


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


async def wait_status(
    cluster: Cluster, name: str, what: str, check: Any, timeout_s: float = 30.0
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        status = await status_of(cluster, name)
        return status if check(status) else None

    return dict(await eventually(probe, what, timeout_s))


async def wait_events(cluster: Cluster, name: str, wanted: set[tuple[str, str]]) -> None:
    """Until the session has Events of these (type, reason): kopf posts them asynchronously."""

    async def probe() -> bool:
        return wanted <= {(e["type"], e["reason"]) for e in await cluster.events(name)}

    await eventually(probe, f"events {sorted(wanted)}")


async def secret_keys(cluster: Cluster, name: str) -> dict[str, bytes]:
    secret = await eventually(lambda: cluster.get("Secret", f"{name}-curve"), "the CURVE Secret")
    return curve_keys(secret)


async def point_at(cluster: Cluster, name: str, address: str) -> None:
    await cluster.patch(
        "TrainingSession", name, {"metadata": {"annotations": {builders.WORKER_ADDRESS_ANNOTATION: address}}}
    )


# ---- create -------------------------------------------------------------------------------------------
async def test_create_makes_the_pod_and_its_neighbours(cluster: Cluster) -> None:
    async with operator(cluster):
        await cluster.create(session_manifest("chat", cluster.namespace))
        pod = await eventually(lambda: cluster.get("Pod", "chat"), "the pod")
        for kind, name in [
            ("Service", "chat"),
            ("ConfigMap", "chat-config"),
            ("PersistentVolumeClaim", "chat-checkpoints"),
            ("Secret", "chat-token"),
            ("Secret", "chat-curve"),
        ]:
            child = await eventually(lambda k=kind, n=name: cluster.get(k, n), f"{kind} {name}")
            assert child["metadata"]["ownerReferences"][0]["name"] == "chat", kind
        assert pod["spec"]["shareProcessNamespace"] is True
        session = await cluster.get("TrainingSession", "chat")
        assert session is not None and "hogwild.dev/finalizer" in session["metadata"]["finalizers"]
        status = await wait_status(
            cluster, "chat", "status written", lambda s: s.get("observedGeneration") == 1
        )
        assert status["podName"] == "chat"
        assert status["phase"] in {"Pending", "Starting", "Degraded"}


async def test_create_then_pod_running_without_a_worker_is_serving(cluster: Cluster) -> None:
    async with operator(cluster):
        await cluster.create(session_manifest("chat", cluster.namespace))
        await eventually(lambda: cluster.get("Pod", "chat"), "the pod")
        if not await cluster.mark_running("chat", vllm_ready=False):
            pytest.skip("a real kubelet runs this pod (it would need real images and a model)")
        await wait_status(
            cluster, "chat", "Starting while vLLM loads", lambda s: s.get("phase") == "Starting"
        )
        await cluster.mark_running("chat", vllm_ready=True)
        status = await wait_status(cluster, "chat", "Serving", lambda s: s.get("phase") == "Serving")
        assert condition(status, "WorkerConnected")["reason"] == "Unreachable"
        assert "step" not in status, "no worker reply, so no training figures"
        await wait_events(
            cluster, "chat", {("Normal", "Pending"), ("Normal", "Starting"), ("Normal", "Serving")}
        )


async def test_invalid_spec_that_bypassed_admission_fails_with_its_reason(cluster: Cluster) -> None:
    if cluster.real:
        pytest.skip("a real API server refuses this spec at admission (see test_crd_admission)")
    async with operator(cluster):
        await cluster.create(session_manifest("big", cluster.namespace, gpu={"count": 2}))
        status = await wait_status(cluster, "big", "Failed", lambda s: s.get("phase") == "Failed")
        assert "one GPU per session" in status["message"]
        assert await cluster.get("Pod", "big") is None
        await wait_events(cluster, "big", {("Warning", "Failed")})


# ---- hot update through a real worker -----------------------------------------------------------------
async def test_hot_update_is_relayed_to_the_real_worker_without_a_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    worker_kit = pytest.importorskip(
        "hogwild.testing.worker_process", reason="the training worker is missing"
    )
    exporter_kit = pytest.importorskip("hogwild.testing.exporter", reason="the stand-in exporter is missing")
    from hogwild.testing.tiny_model import cached

    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    async with operator(cluster):
        await cluster.create(session_manifest("chat", cluster.namespace))
        keys = await secret_keys(cluster, "chat")
        curve_dir = tmp_path / "curve"
        curve_dir.mkdir()
        for name in pod_builder.WORKER_CURVE_FILES:  # what the trainer's mount holds: no client.secret
            (curve_dir / name).write_bytes(keys[name])
        run_dir, checkpoint_dir = tmp_path / "run", tmp_path / "checkpoints"
        run_dir.mkdir()
        exporter = exporter_kit.ExporterProcess(cached(), run_dir, env=env)
        worker = worker_kit.WorkerProcess(run_dir, checkpoint_dir, curve_dir=curve_dir, env=env)
        try:
            ready = worker.wait_connected(timeout_s=120)
            await point_at(cluster, "chat", ready["control_endpoint"])
            await cluster.mark_running("chat")
            pod_uid = (await cluster.get("Pod", "chat") or {})["metadata"]["uid"]
            await wait_status(
                cluster,
                "chat",
                "Training, spec confirmed",
                lambda s: condition(s, "SpecApplied").get("status") == "True",
            )

            await cluster.patch(
                "TrainingSession", "chat", {"spec": {"training": {"lr": 3e-4, "paused": True}}}
            )

            status = await wait_status(
                cluster,
                "chat",
                "generation 2 confirmed by the worker",
                lambda s: (
                    s.get("observedGeneration") == 2 and condition(s, "SpecApplied").get("status") == "True"
                ),
            )
            reported = worker.call("status")["config"]
            assert (reported["lr"], reported["paused"]) == (3e-4, True)
            assert (await cluster.get("Pod", "chat") or {})["metadata"]["uid"] == pod_uid, "no restart"
            config_map = await cluster.get("ConfigMap", "chat-config")
            assert '"lr":0.0003' in (config_map or {})["data"][builders.CONFIG_KEY], (
                "a restarted trainer starts with it"
            )
            if not cluster.real:
                assert status["phase"] == "Paused"
                assert condition(status, "WorkerConnected")["status"] == "True"
            await wait_events(cluster, "chat", {("Normal", "Configured")})
        finally:
            worker.close()
            exporter.close()


# ---- restart-requiring update -------------------------------------------------------------------------
async def test_restart_change_checkpoints_then_replaces_the_pod(cluster: Cluster) -> None:
    async with operator(cluster):
        await cluster.create(session_manifest("chat", cluster.namespace))
        old_pod = await eventually(lambda: cluster.get("Pod", "chat"), "the pod")
        seen_at_checkpoint: list[str | None] = []

        def pod_alive(reason: str) -> None:  # runs in the fake worker's thread, at the checkpoint request
            pod = cluster.get_now("Pod", "chat")
            seen_at_checkpoint.append(
                reason if pod and pod["metadata"]["uid"] == old_pod["metadata"]["uid"] else None
            )

        worker = FakeWorker(await secret_keys(cluster, "chat"), on_checkpoint=pod_alive)
        try:
            await point_at(cluster, "chat", worker.address)
            await cluster.mark_running("chat")
            await wait_status(
                cluster,
                "chat",
                "worker confirmed",
                lambda s: condition(s, "SpecApplied").get("status") == "True",
            )

            await cluster.patch(
                "TrainingSession", "chat", {"spec": {"images": {"vllm": "reg/hogwild-vllm:2"}}}
            )

            async def new_pod() -> dict[str, Any] | None:
                pod = await cluster.get("Pod", "chat")
                return pod if pod and pod["metadata"]["uid"] != old_pod["metadata"]["uid"] else None

            pod = await eventually(new_pod, "the replacement pod")
            assert seen_at_checkpoint == ["pre-restart"], "checkpoint requested while the old pod still ran"
            assert pod["spec"]["initContainers"][0]["image"] == "reg/hogwild-vllm:2"
            await wait_events(cluster, "chat", {("Normal", "Checkpointed"), ("Normal", "Restarting")})
            restarts = [e["message"] for e in await cluster.events("chat") if e["reason"] == "Restarting"]
            assert any("spec.images.vllm changed" in m for m in restarts), restarts
            await cluster.mark_running("chat")
            await wait_status(
                cluster,
                "chat",
                "generation 2 applied on the new pod",
                lambda s: (
                    s.get("observedGeneration") == 2 and condition(s, "SpecApplied").get("status") == "True"
                ),
            )
        finally:
            worker.close()


# ---- operator restart ---------------------------------------------------------------------------------
async def test_operator_restart_makes_no_duplicates_and_keeps_the_keys(cluster: Cluster) -> None:
    async with operator(cluster):
        await cluster.create(session_manifest("chat", cluster.namespace))
        await eventually(lambda: cluster.get("Service", "chat"), "the service")
        before = {
            kind: await eventually(lambda k=kind, n=name: cluster.get(k, n), name) for kind, name in CHILDREN
        }
    posts = cluster.emulator.count("create", "pods") if isinstance(cluster, EmulatorCluster) else None
    async with operator(cluster):
        await wait_status(cluster, "chat", "resumed", lambda s: bool(s.get("phase")))
        after = {kind: await cluster.get(kind, name) for kind, name in CHILDREN}
        for kind, _ in CHILDREN:
            assert (after[kind] or {})["metadata"]["uid"] == before[kind]["metadata"]["uid"], kind
        assert after["Secret"]["data"] == before["Secret"]["data"], "the CURVE keys were not regenerated"
        if isinstance(cluster, EmulatorCluster):
            assert cluster.emulator.count("create", "pods") == posts == 1


CHILDREN = [("Pod", "chat"), ("Service", "chat"), ("ConfigMap", "chat-config"), ("Secret", "chat-curve")]


# ---- delete -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("answers", "event"),
    [(True, ("Normal", "Checkpointed")), (False, ("Warning", "CheckpointFailed"))],
    ids=["answered", "timed-out"],
)
async def test_delete_asks_for_a_final_checkpoint_then_lets_go(
    cluster: Cluster, answers: bool, event: tuple[str, str]
) -> None:
    async with operator(cluster):
        manifest = session_manifest("chat", cluster.namespace, checkpoint={"timeoutSeconds": 1})
        await cluster.create(manifest)
        await eventually(lambda: cluster.get("Pod", "chat"), "the pod")
        worker = FakeWorker(await secret_keys(cluster, "chat"), answer_checkpoints=answers)
        try:
            await point_at(cluster, "chat", worker.address)
            await cluster.mark_running("chat")
            await eventually(lambda: resolved("status" in worker.kinds()), "the worker asked for its status")

            await cluster.delete("TrainingSession", "chat")

            await eventually(lambda: _absent(cluster, "TrainingSession", "chat"), "the session gone")
            assert ("checkpoint", {"reason": "delete"}) in worker.requests
            if isinstance(
                cluster, EmulatorCluster
            ):  # no garbage collector there: the operator removed the pod
                assert await cluster.get("Pod", "chat") is None
                await wait_events(cluster, "chat", {event})
        finally:
            worker.close()


async def _absent(cluster: Cluster, kind: str, name: str) -> bool:
    return await cluster.get(kind, name) is None


# ---- peering ------------------------------------------------------------------------------------------
async def test_peering_lets_only_the_highest_priority_operator_act(cluster: Cluster) -> None:
    if not isinstance(cluster, EmulatorCluster):
        pytest.skip("counts the emulator's creates; test_real_cluster runs peering on a real API server")
    peering = {"operator.peering.enabled": True, **cluster.chart_values}
    for obj in peering_objects(render_chart(cluster.namespace, peering)):  # what `helm install` creates
        await cluster.create_anywhere(obj)
    async with operator(cluster, "--priority=10", **peering):
        async with operator(cluster, "--priority=100", **peering):
            await cluster.create(session_manifest("one", cluster.namespace))
            await eventually(lambda: cluster.get("Pod", "one"), "the first pod")
            await wait_status(cluster, "one", "status", lambda s: s.get("observedGeneration") == 1)
            assert cluster.emulator.count("create", "pods") == 1
            assert cluster.emulator.count("create", "secrets") == 2, (
                "one token and one CURVE Secret, made once"
            )
        # The active operator left (and cleared its peering entry): the paused one takes over.
        await cluster.create(session_manifest("two", cluster.namespace))
        await eventually(lambda: cluster.get("Pod", "two"), "the second pod, made by the remaining operator")
        assert cluster.emulator.count("create", "pods") == 2


# ---- operator health ----------------------------------------------------------------------------------
async def test_operator_serves_metrics_and_health(cluster: Cluster) -> None:
    unused_tcp_port = free_port()
    async with operator(cluster, **{"operator.service.port": unused_tcp_port}):
        await cluster.create(session_manifest("chat", cluster.namespace))
        await wait_status(cluster, "chat", "status", lambda s: bool(s.get("phase")))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{unused_tcp_port}/healthz") as response:
                assert response.status == 200
            async with http.get(f"http://127.0.0.1:{unused_tcp_port}/metrics") as response:
                text = await response.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float | None:
        wanted = tuple(sorted({"namespace": cluster.namespace, "session": "chat", **labels}.items()))
        return samples.get((name, wanted))

    assert (value("hogwild_operator_reconcile_total", trigger="create") or 0) >= 1
    assert (value("hogwild_operator_reconcile_duration_seconds_count") or 0) >= 1
    assert value("hogwild_operator_session_phase", phase="Pending") == 1.0
    assert value("hogwild_operator_session_phase", phase="Training") == 0.0
