"""spec.replicas end to end through the product's `hogwild operator` (the chart's args), against kopf's
emulator in both watch scopes or a real cluster (KUBECONFIG, `e2e`): the same `cluster` fixture as
tests/kube/test_operator_flows.py.

Workers are stand-ins (FakeWorker, real ZMQ and CURVE) that report a replica `group` as a replicated worker
does; the `hogwild.dev/worker-address` annotation names one address per replica ordinal.
"""

from __future__ import annotations

from typing import Any

import pytest
import test_operator_flows as flows
from test_operator_flows import Cluster, condition, point_at, secret_keys, wait_status

from chart_helpers import one, rendered
from hogwild import defaults
from operator_helpers import (
    EmulatorCluster,
    FakeWorker,
    eventually,
    resolved,
    run_operator,
    session_manifest,
)

pytestmark = pytest.mark.timeout(240)
cluster = flows.cluster  # the fixture: emulator in both watch scopes, or a real cluster (e2e)


def group(replica: int, size: int, *, in_sync: bool = True) -> dict[str, Any]:
    return {
        "replica": replica,
        "state": "formed",
        "rank": replica,
        "size": size,
        "members": list(range(size)),
        "epoch": 1,
        "in_sync": in_sync,
        "digest": "d-1",
    }


ALONE = {"replica": 0, "state": "alone", "rank": 0, "size": 1, "members": [0], "epoch": 0, "in_sync": True}


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    trainer = next(c for c in pod["spec"]["containers"] if c["name"] == "trainer")
    return {e["name"]: e.get("value", "") for e in trainer.get("env", [])}


async def uid(cluster: Cluster, name: str) -> str | None:
    pod = await cluster.get("Pod", name)
    return None if pod is None else str(pod["metadata"]["uid"])


async def gone(cluster: Cluster, kind: str, name: str) -> bool:
    found = await cluster.get(kind, name)
    return found is None or bool(found["metadata"].get("deletionTimestamp"))


async def scale(cluster: Cluster, count: int) -> None:
    await cluster.patch("TrainingSession", "chat", {"spec": {"replicas": count}})


async def test_scale_1_2_3_1_is_hot(cluster: Cluster) -> None:
    async with run_operator(cluster):
        await cluster.create(session_manifest("chat", cluster.namespace))
        keys = await secret_keys(cluster, "chat")
        checkpoints: list[str] = []
        w0 = FakeWorker(keys, on_checkpoint=checkpoints.append, group=ALONE)  # built for one replica
        w1 = FakeWorker(keys, group=group(1, 2))
        try:
            await point_at(cluster, "chat", f"{w0.address},{w1.address}")
            await eventually(lambda: cluster.get("Pod", "chat"), "replica 0's pod")
            await cluster.mark_running("chat")
            one = await wait_status(
                cluster, "chat", "one replica, in sync", lambda s: s.get("inSyncReplicas") == 1
            )
            assert (one["replicas"], one["readyReplicas"]) == (1, 1)
            assert [e["replica"] for e in one["replicaStatuses"]] == [0]
            # One replica: no budget; the headless Service exists for every session.
            assert await cluster.get("PodDisruptionBudget", "chat") is None
            headless = await eventually(lambda: cluster.get("Service", "chat-replicas"), "headless Service")
            assert headless["spec"]["clusterIP"] == "None"
            first_uid = await uid(cluster, "chat")
            pod0 = await cluster.get("Pod", "chat") or {}
            assert defaults.ENV_RENDEZVOUS not in env_of(pod0)
            assert (pod0["spec"]["hostname"], pod0["spec"]["subdomain"]) == ("replica-0", "chat-replicas")

            # 1 -> 2: replica 1 is added; replica 0 (built for one) joins the group in place, told by the
            # operator over CURVE, and hosts the store that replica 1 finds by replica 0's DNS name.
            await scale(cluster, 2)
            pod1 = await eventually(lambda: cluster.get("Pod", "chat-1"), "replica 1's pod")
            assert env_of(pod1)[defaults.ENV_REPLICA] == "1"
            rendezvous = env_of(pod1)[defaults.ENV_RENDEZVOUS]
            assert rendezvous == f"replica-0.chat-replicas.{cluster.namespace}.svc:{defaults.RENDEZVOUS_PORT}"
            assert pod1["spec"]["subdomain"] == "chat-replicas"
            pdb = await eventually(lambda: cluster.get("PodDisruptionBudget", "chat"), "the budget")
            assert pdb["spec"]["maxUnavailable"] == 1
            await eventually(lambda: _asked_to_join(w0), "replica 0's worker told to join")
            assert ("join", {"replica": 0, "rendezvous": rendezvous, "host_store": True}) in w0.requests
            await cluster.mark_running("chat-1")
            two = await wait_status(
                cluster, "chat", "two replicas in sync", lambda s: s.get("inSyncReplicas") == 2
            )
            assert await uid(cluster, "chat") == first_uid, "replica 0 joined without a restart"
            assert "pre-restart" not in checkpoints
            entries = {e["replica"]: e for e in two["replicaStatuses"]}
            assert (entries[0]["pod"], entries[1]["pod"]) == ("chat", "chat-1")
            assert entries[1]["groupState"] == "formed" and entries[1]["groupSize"] == 2

            # A hot change reaches every replica's worker.
            await cluster.patch("TrainingSession", "chat", {"spec": {"training": {"lr": 3e-4}}})
            await eventually(
                lambda: _both_have_lr(w0, w1, 3e-4), "lr relayed to both replicas' workers", timeout_s=60
            )

            # 2 -> 3 -> 1: pods that stay are never touched.
            uids = {name: await uid(cluster, name) for name in ("chat", "chat-1")}
            await scale(cluster, 3)
            await eventually(lambda: cluster.get("Pod", "chat-2"), "replica 2's pod")
            await scale(cluster, 1)
            for name in ("chat-2", "chat-1"):
                await eventually(lambda n=name: gone(cluster, "Pod", n), f"pod {name} removed")
            await eventually(lambda: gone(cluster, "PodDisruptionBudget", "chat"), "the budget removed")
            assert await uid(cluster, "chat") == uids["chat"], "replica 0 kept through the scaling"
            assert await cluster.get("Service", "chat-replicas") is not None, (
                "replica 0 still resolves its store"
            )
            back = await wait_status(
                cluster,
                "chat",
                "one replica again",
                lambda s: s.get("replicas") == 1 and s["readyReplicas"] == 1,
            )
            assert condition(back, "Ready")["status"] == "True"
            if isinstance(cluster, EmulatorCluster):
                assert_rbac_covers(cluster.emulator.operator_verbs)
        finally:
            w0.close()
            w1.close()


async def test_a_lone_worker_that_cannot_join_says_so_and_its_pod_stays(cluster: Cluster) -> None:
    """A worker image older than the operator (no `join`): the session's SpecApplied condition says why its
    replica stays alone; the pod is not replaced for it (a new one would be built the same)."""
    async with run_operator(cluster):
        await cluster.create(session_manifest("chat", cluster.namespace))
        keys = await secret_keys(cluster, "chat")
        w0 = FakeWorker(keys, group=ALONE, knows_join=False)
        w1 = FakeWorker(keys, group=group(1, 2))
        try:
            await point_at(cluster, "chat", f"{w0.address},{w1.address}")
            await eventually(lambda: cluster.get("Pod", "chat"), "replica 0's pod")
            await cluster.mark_running("chat")
            first_uid = await uid(cluster, "chat")
            await scale(cluster, 2)
            await eventually(lambda: cluster.get("Pod", "chat-1"), "replica 1's pod")
            await cluster.mark_running("chat-1")

            def refused(s: dict[str, Any]) -> bool:
                return "cannot join the replica group" in (condition(s, "SpecApplied") or {}).get(
                    "message", ""
                )

            said = await wait_status(cluster, "chat", "the join refusal in the status", refused)
            assert "unknown_type" in condition(said, "SpecApplied")["message"]
            assert await uid(cluster, "chat") == first_uid
        finally:
            w0.close()
            w1.close()


def assert_rbac_covers(used: set[tuple[str, str, str]]) -> None:
    """Every (group, resource, verb) the operator used is one the chart's Role grants (a real API server
    would refuse the rest), and the replicas' own verbs were really used (the flow is not vacuous)."""
    role = one(rendered("default"), "ClusterRole")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert used <= granted, f"the chart's RBAC lacks {sorted(used - granted)}"
    replica_verbs = {
        ("policy", "poddisruptionbudgets", "create"),
        ("policy", "poddisruptionbudgets", "delete"),
        ("", "pods", "delete"),
        ("", "services", "create"),
        ("networking.k8s.io", "networkpolicies", "create"),
    }
    assert replica_verbs <= used, sorted(replica_verbs - used)


async def _asked_to_join(worker: FakeWorker) -> bool:
    return "join" in worker.kinds()


async def _both_have_lr(w0: FakeWorker, w1: FakeWorker, lr: float) -> bool:
    return w0.config.lr == lr and w1.config.lr == lr


async def test_delete_checkpoints_through_one_running_replica_then_removes_them_all(cluster: Cluster) -> None:
    """Replica 0 never started; replica 1 runs: the final checkpoint is asked of replica 1 alone."""
    async with run_operator(cluster):
        await cluster.create(session_manifest("chat", cluster.namespace, replicas=2))
        keys = await secret_keys(cluster, "chat")
        asked: dict[int, list[str]] = {0: [], 1: []}
        workers = [FakeWorker(keys, on_checkpoint=asked[i].append, group=group(i, 2)) for i in (0, 1)]
        try:
            await point_at(cluster, "chat", ",".join(w.address for w in workers))
            await eventually(lambda: cluster.get("Pod", "chat-1"), "replica 1's pod")
            assert await cluster.get("PodDisruptionBudget", "chat") is not None
            await cluster.mark_running("chat-1")
            await wait_status(
                cluster,
                "chat",
                "replica 1 answers",
                lambda s: any(e.get("groupState") == "formed" for e in s.get("replicaStatuses", [])),
            )
            await cluster.delete("TrainingSession", "chat")
            await eventually(
                lambda: resolved(cluster.get_now("TrainingSession", "chat") is None), "the session gone"
            )
            events = [(e["reason"], e["message"]) for e in await cluster.events("chat")]
            assert (asked[0], asked[1]) == ([], ["delete"]), events
            for name in ("chat", "chat-1"):
                assert await gone(cluster, "Pod", name), name
        finally:
            for worker in workers:
                worker.close()


async def test_restart_change_checkpoints_once_then_replaces_every_replica(cluster: Cluster) -> None:
    async with run_operator(cluster):
        await cluster.create(session_manifest("chat", cluster.namespace, replicas=2))
        keys = await secret_keys(cluster, "chat")
        asked: dict[int, list[str]] = {0: [], 1: []}
        workers = [FakeWorker(keys, on_checkpoint=asked[i].append, group=group(i, 2)) for i in (0, 1)]
        try:
            await point_at(cluster, "chat", ",".join(w.address for w in workers))
            for name in ("chat", "chat-1"):
                await eventually(lambda n=name: cluster.get("Pod", n), f"pod {name}")
                await cluster.mark_running(name)
            await wait_status(cluster, "chat", "both in sync", lambda s: s.get("inSyncReplicas") == 2)
            before = {name: await uid(cluster, name) for name in ("chat", "chat-1")}

            await cluster.patch("TrainingSession", "chat", {"spec": {"images": {"vllm": "reg/vllm:2"}}})

            async def replaced() -> bool:
                now = {name: await uid(cluster, name) for name in before}
                return all(now[n] is not None and now[n] != before[n] for n in before)

            await eventually(replaced, "both replicas replaced")
            assert (asked[0], asked[1]) == (["pre-restart"], []), "one checkpoint, through replica 0"
            for name in before:
                pod = await cluster.get("Pod", name) or {}
                assert pod["spec"]["initContainers"][0]["image"] == "reg/vllm:2", name
        finally:
            for worker in workers:
                worker.close()
