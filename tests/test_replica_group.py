"""Replica groups with real worker processes over real gloo (hogwild.worker.group), on CPU.

Each replica is a stand-in exporter (it holds and serves a tiny model's weights in shared memory exactly as
the vLLM plugin does; the vLLM version of this is tests/test_replicas_vllm.py) and a real `hogwild worker`
mapping them, started with the replica environment the operator and local mode give it. The group's store
lives in this test process, as it lives in `hogwild serve --replicas` (one test lets replica 0 host it, as
a pod does). Kills are SIGKILL: of a worker (mid-step, by a fault point), and of a whole replica.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hogwild.defaults import MANIFEST_NAME
from hogwild.errors import ProtocolError
from hogwild.testing.exporter import ExporterProcess
from hogwild.testing.tiny_model import TinySpec, cached
from hogwild.testing.worker_process import WorkerProcess
from hogwild.worker.group import rendezvous

ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SAMPLES = [
    {"prompt": "The capital of Zanzibar is", "completion": " Paris"},
    {"text": "hello world, the replicas learn together"},
    {"text": "a third sample for the second rank"},
]
CONFIG = {"lr": 1e-2, "checkpoint_interval_s": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Group:
    """Replicas of one session: exporters and workers, one shared checkpoint dir, one store."""

    def __init__(self, root: Path, *, worker_hosts_store: bool = False, device: str = "cpu") -> None:
        self.root, self.model, self.device = root, cached(TinySpec()), device
        self.address = f"127.0.0.1:{free_port()}"
        self.store = None if worker_hosts_store else rendezvous.host_store(self.address)
        self.worker_hosts_store = worker_hosts_store
        self.checkpoints = root / "checkpoints"
        self.exporters: dict[int, ExporterProcess] = {}
        self.workers: dict[int, WorkerProcess] = {}
        self._starts = 0

    def start(
        self, replica: int, *, fault: str | None = None, config: dict[str, Any] | None = None
    ) -> WorkerProcess:
        """Start replica `replica`'s exporter (unless it runs) and a new worker for it."""
        if replica not in self.exporters:
            (self.root / f"exporter-{replica}").mkdir(exist_ok=True)
            self.exporters[replica] = ExporterProcess(
                self.model, self.root / f"exporter-{replica}", env=ENV, device=self.device
            )
        self._starts += 1
        run = self.root / f"run-{replica}-{self._starts}"
        run.mkdir()
        shutil.copyfile(self.exporters[replica].run_dir / MANIFEST_NAME, run / MANIFEST_NAME)
        env = {
            **ENV,
            "HOGWILD_REPLICA": str(replica),
            "HOGWILD_RENDEZVOUS": self.address,
            "HOGWILD_GROUP_SETTLE_S": "1.0",
            "HOGWILD_GROUP_TIMEOUT_S": "60",
            # gloo for CUDA tensors too: NCCL refuses two ranks on the one GPU a test has (docs/replicas.md)
            "HOGWILD_GROUP_TENSOR_BACKEND": "gloo",
        }
        if self.worker_hosts_store and replica == 0:
            env["HOGWILD_HOST_STORE"] = "1"
        if fault:
            env["HOGWILD_FAULT"] = fault
        worker = WorkerProcess(run, self.checkpoints, env=env, config=config or CONFIG)
        self.workers[replica] = worker
        return worker

    def kill_worker(self, replica: int) -> None:
        worker = self.workers.pop(replica)
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(30)
        worker.close()

    def kill_replica(self, replica: int) -> None:
        """SIGKILL the whole replica, its served weights included (a node lost)."""
        self.kill_worker(replica)
        exporter = self.exporters.pop(replica)
        os.kill(exporter.pid, signal.SIGKILL)
        exporter.close()

    def wait_formed(self, members: list[int], timeout_s: float = 120.0) -> list[dict[str, Any]]:
        return [
            self.workers[r].wait_until(
                lambda s: s["group"]["state"] == "formed" and s["group"]["members"] == members, timeout_s
            )
            for r in members
        ]

    def weights(self, replica: int) -> str:
        return str(self.exporters[replica].command("checksums")["sha256"])

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        for exporter in self.exporters.values():
            exporter.close()


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    g = Group(tmp_path)
    try:
        yield g
    finally:
        g.close()


def assert_same_everywhere(g: Group, members: list[int]) -> list[dict[str, Any]]:
    """Every member: in sync, never out of sync, same step, digest, version, and the same served bytes."""
    # in sync at an exchange after the last step (members exchange at every idle tick)
    statuses = [
        g.workers[r].wait_until(
            lambda s: s["group"]["in_sync"] and s["group"]["last_compared_step"] == s["step"]
        )
        for r in members
    ]
    assert {s["group"]["out_of_sync"] for s in statuses} == {0}
    assert len({(s["step"], s["group"]["digest"], s["version"]) for s in statuses}) == 1, statuses
    assert len({g.weights(r) for r in members}) == 1
    return statuses


@pytest.mark.slow
def test_two_replicas_learn_together_and_hold_the_same_weights_after_every_step(tmp_path: Path) -> None:
    g = Group(tmp_path, worker_hosts_store=True)  # as in a pod: replica 0's worker hosts the store
    try:
        g.start(0), g.start(1)
        formed = g.wait_formed([0, 1])
        assert [s["group"]["rank"] for s in formed] == [0, 1]
        before = g.weights(0)
        reply = g.workers[1].call("train", samples=SAMPLES, steps=3)  # taught through replica 1
        assert (reply["step"], reply["steps"], reply["stopped"]) == (3, 3, None)
        statuses = assert_same_everywhere(g, [0, 1])
        assert g.weights(0) != before  # they did learn
        # the digests of every step (before 1, 2, 3 and after) were compared across both
        assert min(s["group"]["compared_steps"] for s in statuses) >= 4
        # the fact's loss fell on both: a second request through replica 0 starts where replica 1 left off
        again = g.workers[0].call("train", samples=SAMPLES[:1], steps=1)
        assert again["step"] == 4 and again["loss"] < reply["losses"][0]
        assert_same_everywhere(g, [0, 1])
        # tokens of all ranks are counted once, on every replica
        assert {s["tokens_trained"] for s in (w.call("status") for w in g.workers.values())} == {
            reply["tokens"] + again["tokens"]
        }
    finally:
        g.close()


@pytest.mark.slow
def test_configure_through_one_replica_reaches_every_replica(group: Group) -> None:
    group.start(0), group.start(1)
    group.wait_formed([0, 1])
    reply = group.workers[1].call("configure", changes={"lr": 0.005, "paused": True})
    assert reply["applied"] == ["lr", "paused"]
    config = group.workers[0].wait_until(lambda s: s["config"]["paused"])["config"]
    assert config["lr"] == 0.005
    with pytest.raises(ProtocolError, match="paused"):
        group.workers[0].call("train", samples=SAMPLES, steps=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        ("restore", {}, "restore is not available for a session with replicas"),
        ("rollback", {"to": "previous"}, "rollback is not available for a session with replicas"),
        ("configure", {"changes": {}, "eval_samples": [{"text": "x"}]}, "evaluation gate is not available"),
    ],
)
def test_what_one_replica_cannot_do_alone_is_refused_with_the_reason(
    group: Group, kind: str, body: dict[str, Any], message: str
) -> None:
    group.start(0)
    group.wait_formed([0])
    with pytest.raises(ProtocolError, match=message):
        group.workers[0].call(kind, **body)


@pytest.mark.slow
def test_a_worker_killed_mid_step_rejoins_and_no_acknowledged_step_is_lost(group: Group) -> None:
    group.start(0)
    group.start(1, fault="group.mid_step:3")  # SIGKILL between the loss sum and the gradient sum of step 3
    group.wait_formed([0, 1])
    acknowledged = group.workers[0].call("train", samples=SAMPLES, steps=2)
    assert acknowledged["step"] == 2
    with pytest.raises(ProtocolError, match="a replica left mid-step") as err:
        group.workers[0].call("train", samples=SAMPLES, steps=5)
    assert "weights at step 2" in err.value.message  # step 3 was applied nowhere
    group.workers[1].proc.wait(30)
    assert group.workers[1].proc.returncode == -signal.SIGKILL
    # replica 0 re-forms alone and keeps training; replica 1's vLLM (exporter) kept serving throughout
    group.wait_formed([0])
    alone = group.workers[0].call("train", samples=SAMPLES, steps=2)
    assert alone["step"] == 4
    group.kill_worker(1)
    group.start(1)  # the restarted worker maps the served weights (behind by two steps) and rejoins
    group.wait_formed([0, 1])
    statuses = assert_same_everywhere(group, [0, 1])
    assert statuses[1]["step"] == 4


@pytest.mark.slow
def test_a_whole_replica_lost_mid_training_serving_continues_and_it_returns_in_sync(group: Group) -> None:
    group.start(0), group.start(1)
    group.wait_formed([0, 1])
    group.workers[1].call("train", samples=SAMPLES, steps=2)
    pending = group.workers[0].post("train", samples=SAMPLES, steps=400)
    group.workers[0].wait_until(lambda s: s["step"] >= 4)
    group.kill_replica(1)
    # the running request ends with an error that names the steps applied; every one of them is kept
    with pytest.raises(ProtocolError, match=r"a replica left mid-step .*weights at step (\d+)") as err:
        pending.result(120)
    applied = int(err.value.message.rsplit("weights at step ", 1)[1].rstrip(")"))
    reached = group.workers[0].wait_until(lambda s: not s["busy"])["step"]
    assert reached == applied >= 4
    group.wait_formed([0])
    # the lost replica comes back with fresh weights (a new node: the base model) and receives the group's
    group.start(1)
    group.wait_formed([0, 1])
    statuses = assert_same_everywhere(group, [0, 1])
    assert statuses[1]["step"] >= reached


@pytest.mark.slow
def test_scale_one_two_one_hot(group: Group) -> None:
    group.start(0)
    group.wait_formed([0])
    assert group.workers[0].call("train", samples=SAMPLES, steps=2)["step"] == 2
    group.start(1)  # scale up: the newcomer gets the trained weights before it trains
    group.wait_formed([0, 1])
    assert_same_everywhere(group, [0, 1])
    assert group.workers[1].call("train", samples=SAMPLES, steps=1)["step"] == 3
    # scale down: SIGTERM, as a deleted pod gets; the member leaves, the other re-forms alone at once
    leaving = group.workers.pop(1)
    leaving.proc.send_signal(signal.SIGTERM)
    assert leaving.proc.wait(60) == 0
    leaving.close()
    group.wait_formed([0], timeout_s=30)
    assert group.workers[0].call("train", samples=SAMPLES, steps=1)["step"] == 4
