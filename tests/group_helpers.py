"""A replica group's processes for the worker tests: stand-in exporters, real workers, one store.

Each replica is a stand-in exporter (it holds and serves a tiny model's weights in shared memory, or CUDA
memory, exactly as the vLLM plugin does) and a real `hogwild worker` mapping them, started with the replica
environment the operator and local mode give it. The store lives in the test process, as in `hogwild serve
--replicas` (or in replica 0's worker, as in a pod).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from hogwild import auth
from hogwild.defaults import MANIFEST_NAME
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
        self.curve = auth.write_curve_dir(root / "curve")

    def start(
        self,
        replica: int,
        *,
        fault: str | None = None,
        config: dict[str, Any] | None = None,
        alone: bool = False,
    ) -> WorkerProcess:
        """Start replica `replica`'s exporter (unless it runs) and a new worker for it. `alone`: as a pod built
        for one replica (no group environment), with the operator's CURVE channel (`self.curve`) to join later."""
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
        if alone:
            env = {
                k: v
                for k, v in env.items()
                if k not in {"HOGWILD_REPLICA", "HOGWILD_RENDEZVOUS", "HOGWILD_HOST_STORE"}
            }
        curve = self.curve if alone else None
        worker = WorkerProcess(run, self.checkpoints, env=env, config=config or CONFIG, curve_dir=curve)
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


def assert_same_everywhere(g: Group, members: list[int], timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Every member: in sync, never out of sync, same step, digest, version, and the same served bytes."""

    # The request's reply comes from one member; the others apply the same last step a few ms later (skew),
    # so wait until every member is idle and compared at its own step, and all stand at the same step.
    def settled(s: dict[str, Any]) -> bool:
        return not s["busy"] and s["group"]["in_sync"] and s["group"]["last_compared_step"] == s["step"]

    deadline = time.monotonic() + timeout_s
    while True:
        statuses = [g.workers[r].wait_until(settled, timeout_s) for r in members]
        if len({s["step"] for s in statuses}) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert {s["group"]["out_of_sync"] for s in statuses} == {0}
    assert len({(s["step"], s["group"]["digest"], s["version"]) for s in statuses}) == 1, statuses
    assert len({g.weights(r) for r in members}) == 1
    return statuses
