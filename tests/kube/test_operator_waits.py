"""What the operator waits for before a pod goes, and what it says meanwhile: the product's `hogwild operator`
(the chart's command and args) against kopf's kmock emulator, or a real cluster when KUBECONFIG is set (`e2e`).

A restart-requiring change or a delete turns the phase to Restarting or Terminating at once, with an Event
naming the final checkpoint and how long it is waited for; a worker the last status check found unreachable
is not waited for at all (CheckpointSkipped, saying what may be lost); a reachable worker that never answers
is waited for at most the bound (`--final-checkpoint-timeout`, or a shorter `spec.checkpoint.timeoutSeconds`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

from hogwild.operator import builders
from operator_helpers import (
    EmulatorCluster,
    FakeWorker,
    KubectlCluster,
    curve_keys,
    eventually,
    run_operator,
    session_manifest,
)
from operator_process import free_port

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "hogwild.dev_trainingsessions.yaml"
PROMPT_S = 3.0  # "at once": a watch event and one reconcile, never the checkpoint's bound
pytestmark = pytest.mark.timeout(120)
Cluster = EmulatorCluster | KubectlCluster


operator = run_operator


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


async def wait_status(cluster: Cluster, what: str, check: Any, timeout_s: float = 30.0) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        status = dict(((await cluster.get("TrainingSession", "chat")) or {}).get("status") or {})
        return status if check(status) else None

    return dict(await eventually(probe, what, timeout_s))


async def event(cluster: Cluster, reason: str, timeout_s: float = 30.0) -> str:
    """The message of the session's first Event with this reason (kopf posts them asynchronously)."""

    async def probe() -> str | None:
        found = [e["message"] for e in await cluster.events("chat") if e["reason"] == reason]
        return found[0] if found else None

    return str(await eventually(probe, f"a {reason} Event", timeout_s))


async def gone(cluster: Cluster, timeout_s: float) -> None:
    async def probe() -> bool:
        return await cluster.get("TrainingSession", "chat") is None

    await eventually(probe, "the session gone", timeout_s)


async def running_session(cluster: Cluster, address: str | None, **spec: Any) -> dict[str, bytes]:
    """A session whose pod runs, its worker redirected to `address` (None: a FakeWorker made by the caller
    with the keys returned, pointed at afterwards with `point_at`)."""
    await cluster.create(session_manifest("chat", cluster.namespace, **spec))
    await eventually(lambda: cluster.get("Pod", "chat"), "the pod")
    secret = await eventually(lambda: cluster.get("Secret", "chat-curve"), "the CURVE Secret")
    if address is not None:
        await point_at(cluster, address)
    if not await cluster.mark_running("chat"):
        pytest.skip("a real kubelet runs this pod: these flows need the worker redirected to a FakeWorker")
    return curve_keys(secret)


async def point_at(cluster: Cluster, address: str) -> None:
    annotations = {builders.WORKER_ADDRESS_ANNOTATION: address}
    await cluster.patch("TrainingSession", "chat", {"metadata": {"annotations": annotations}})


def nobody_listening() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


async def worker_unreachable(cluster: Cluster) -> None:
    await wait_status(
        cluster,
        "the status records the worker as unreachable",
        lambda s: condition(s, "WorkerConnected").get("reason") == "Unreachable",
    )


async def worker_connected(cluster: Cluster) -> None:
    await wait_status(
        cluster, "the worker connected", lambda s: condition(s, "WorkerConnected").get("status") == "True"
    )


async def new_image(cluster: Cluster) -> float:
    await cluster.patch("TrainingSession", "chat", {"spec": {"images": {"vllm": "reg/hogwild-vllm:2"}}})
    return time.monotonic()


async def replaced(cluster: Cluster, old_uid: str, timeout_s: float) -> None:
    async def probe() -> bool:
        pod = await cluster.get("Pod", "chat")
        return bool(pod and pod["metadata"]["uid"] != old_uid)

    await eventually(probe, "the replacement pod", timeout_s)


async def pod_uid(cluster: Cluster) -> str:
    return str(((await cluster.get("Pod", "chat")) or {})["metadata"]["uid"])


# ---- a restart-requiring change -----------------------------------------------------------------------
async def test_restart_with_an_unreachable_worker_replaces_the_pod_at_once(cluster: Cluster) -> None:
    async with operator(cluster):  # the default bound: 300 s
        await running_session(cluster, nobody_listening())
        await worker_unreachable(cluster)
        old = await pod_uid(cluster)

        await new_image(cluster)

        await replaced(cluster, old, PROMPT_S)
        await wait_status(
            cluster, "generation 2 observed", lambda s: s.get("observedGeneration") == 2, PROMPT_S
        )
        skipped = await event(cluster, "CheckpointSkipped")
        assert skipped.startswith("no final checkpoint before replacing pod chat: the worker did not answer")
        assert "may be lost" in skipped


async def test_restart_with_a_silent_worker_says_restarting_and_waits_the_bound(cluster: Cluster) -> None:
    async with operator(cluster, "--final-checkpoint-timeout=3"):
        worker = FakeWorker(await running_session(cluster, None), answer_checkpoints=False)
        try:
            await point_at(cluster, worker.address)
            await worker_connected(cluster)
            old = await pod_uid(cluster)

            started = await new_image(cluster)

            status = await wait_status(
                cluster,
                "Restarting, generation 2 observed",
                lambda s: s.get("phase") == "Restarting" and s.get("observedGeneration") == 2,
                PROMPT_S,
            )
            assert "waiting up to 3 s" in status["message"] and "final checkpoint" in status["message"]
            assert condition(status, "SpecApplied")["reason"] == "Restarting"
            waiting = await event(cluster, "Checkpointing", PROMPT_S)
            assert "waiting up to 3 s" in waiting
            assert "for the final checkpoint before replacing pod chat (spec.images.vllm changed)" in waiting
            assert "3 s is the operator's --final-checkpoint-timeout (the spec asks 300 s)" in waiting

            await replaced(cluster, old, 3 + PROMPT_S)
            assert time.monotonic() - started >= 2.5, "the reachable worker was given its bound"
            assert ("checkpoint", {"reason": "pre-restart"}) in worker.requests
            failed = await event(cluster, "CheckpointFailed")
            assert "replacing pod chat anyway" in failed
        finally:
            worker.close()


# ---- a delete -----------------------------------------------------------------------------------------
async def test_delete_with_an_unreachable_worker_lets_go_at_once(cluster: Cluster) -> None:
    async with operator(cluster):  # the default bound: 300 s
        await running_session(cluster, nobody_listening())
        await worker_unreachable(cluster)

        await cluster.delete("TrainingSession", "chat")

        await gone(cluster, PROMPT_S)
        skipped = await event(cluster, "CheckpointSkipped")
        assert skipped.startswith("no final checkpoint before deleting pod chat: the worker did not answer")
        assert "may be lost" in skipped


async def test_delete_with_a_silent_worker_says_terminating_and_waits_the_spec_bound(
    cluster: Cluster,
) -> None:
    async with operator(cluster):
        worker = FakeWorker(
            await running_session(cluster, None, checkpoint={"timeoutSeconds": 3}), answer_checkpoints=False
        )
        try:
            await point_at(cluster, worker.address)
            await worker_connected(cluster)
            started = time.monotonic()

            await cluster.delete("TrainingSession", "chat")

            status = await wait_status(
                cluster, "Terminating", lambda s: s.get("phase") == "Terminating", PROMPT_S
            )
            assert "waiting up to 3 s" in status["message"] and "final checkpoint" in status["message"]
            waiting = await event(cluster, "Checkpointing", PROMPT_S)
            assert "waiting up to 3 s" in waiting and "before deleting pod chat" in waiting
            await gone(cluster, 3 + PROMPT_S)
            assert time.monotonic() - started >= 2.5, "the reachable worker was given its bound"
            assert ("checkpoint", {"reason": "delete"}) in worker.requests
            assert "deleting pod chat anyway" in await event(cluster, "CheckpointFailed")
        finally:
            worker.close()


async def test_delete_during_a_restart_wait_takes_over_that_checkpoint(cluster: Cluster) -> None:
    async with operator(cluster, "--final-checkpoint-timeout=4"):
        worker = FakeWorker(await running_session(cluster, None), answer_checkpoints=False)
        try:
            await point_at(cluster, worker.address)
            await worker_connected(cluster)
            started = await new_image(cluster)
            await wait_status(cluster, "Restarting", lambda s: s.get("phase") == "Restarting", PROMPT_S)

            await cluster.delete("TrainingSession", "chat")

            await wait_status(cluster, "Terminating", lambda s: s.get("phase") == "Terminating", PROMPT_S)
            await gone(cluster, 4 + PROMPT_S)
            assert time.monotonic() - started < 4 + PROMPT_S, "one bound in all, not one each"
            asked = [body["reason"] for kind, body in worker.requests if kind == "checkpoint"]
            assert asked == ["pre-restart"], "the delete waited on the checkpoint already asked for"
        finally:
            worker.close()


async def test_delete_while_the_pod_is_being_deleted_does_not_wait(cluster: Cluster) -> None:
    """What a namespace delete looks like: the pod is already going, its worker checkpoints on SIGTERM."""
    async with operator(cluster):
        worker = FakeWorker(await running_session(cluster, None), answer_checkpoints=False)
        try:
            await point_at(cluster, worker.address)
            await worker_connected(cluster)
            await cluster.patch("Pod", "chat", {"metadata": {"finalizers": ["test.hogwild.dev/hold"]}})
            await cluster.delete("Pod", "chat")
            await eventually(
                lambda: _pod_terminating(cluster), "the pod terminating (held by a test finalizer)"
            )

            await cluster.delete("TrainingSession", "chat")

            await gone(cluster, PROMPT_S)
            skipped = await event(cluster, "CheckpointSkipped")
            assert "pod chat is already being deleted" in skipped
            assert not [kind for kind, _ in worker.requests if kind == "checkpoint"]
        finally:
            worker.close()
            with contextlib.suppress(Exception):
                await cluster.patch("Pod", "chat", {"metadata": {"finalizers": None}})


async def _pod_terminating(cluster: Cluster) -> bool:
    pod = await cluster.get("Pod", "chat")
    return bool(pod and pod["metadata"].get("deletionTimestamp"))
