"""Replica groups with real worker processes over real gloo (hogwild.worker.group), on CPU.

Each replica is a stand-in exporter (it holds and serves a tiny model's weights in shared memory exactly as
the vLLM plugin does; the vLLM version of this is tests/serving/test_replicas_vllm.py) and a real `hogwild worker`
mapping them, started with the replica environment the operator and local mode give it. The group's store
lives in this test process, as it lives in `hogwild serve --replicas` (one test lets replica 0 host it, as
a pod does). Kills are SIGKILL: of a worker (mid-step, by a fault point), and of a whole replica.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from group_helpers import SAMPLES, Group, assert_same_everywhere
from hogwild import auth
from hogwild.errors import ProtocolError
from hogwild.testing.worker_process import call


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
        # the origin's restore fails: nothing is taken from it, on any member
        ("restore", {"step": 99}, "no complete checkpoint of step 99"),
        ("rollback", {"to": "previous"}, "nothing kept matches previous"),
        # the gate is on and no member holds an evaluation set: every member refuses the request
        ("configure", {"changes": {"gate": {"max_loss_rise": 0.0}}}, "needs an evaluation set"),
    ],
)
def test_what_the_group_cannot_do_is_refused_with_the_reason_and_changes_nothing(
    group: Group, kind: str, body: dict[str, Any], message: str
) -> None:
    group.start(0), group.start(1)
    group.wait_formed([0, 1])
    before = [group.weights(r) for r in (0, 1)]
    with pytest.raises(ProtocolError, match=message):
        group.workers[1].call(kind, **body)
    statuses = assert_same_everywhere(group, [0, 1])
    assert [group.weights(r) for r in (0, 1)] == before and {s["step"] for s in statuses} == {0}


@pytest.mark.slow
def test_the_gate_judges_a_shared_request_once_and_every_replica_reverts_it(group: Group) -> None:
    group.start(0), group.start(1)
    group.wait_formed([0, 1])
    w = group.workers
    fact, lie = SAMPLES[0], {**SAMPLES[0], "completion": " Berlin"}
    assert w[0].call("train", samples=[fact], steps=2)["step"] == 2
    # the evaluation set and the gate, sent to one replica, reach both (a configure goes through the group)
    w[1].call("configure", changes={"gate": {"max_loss_rise": 0.0}}, eval_samples=[fact])
    kept, version = group.weights(0), assert_same_everywhere(group, [0, 1])[0]["version"]
    reply = w[0].call("train", samples=[lie, SAMPLES[1]], steps=3)  # each member trains its share
    gate = reply["gate"]
    assert gate["verdict"] == "reverted" and gate["loss_after"] > gate["loss_before"]
    statuses = assert_same_everywhere(group, [0, 1])  # one verdict, one revert, one version on both
    assert [s["step"] for s in statuses] == [2, 2] and group.weights(1) == kept
    assert {s["version"] for s in statuses} == {reply["version"]} != {version}
    assert [s["gate"]["reverts"] for s in statuses] == [1, 1]
    # an update the gate accepts is kept on both
    accepted = w[1].call("train", samples=[fact], steps=1)
    assert accepted["gate"]["verdict"] == "accepted" and accepted["step"] == 3
    assert_same_everywhere(group, [0, 1])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "via"),
    [("restore", 1), ("rollback", 0), ("rollback", 1)],
    ids=["restore-1", "rollback-0", "rollback-1"],
)
def test_a_restore_or_rollback_through_one_replica_changes_every_replica(
    group: Group, kind: str, via: int
) -> None:
    group.start(0), group.start(1)
    group.wait_formed([0, 1])
    w = group.workers
    assert w[0].call("train", samples=SAMPLES, steps=2)["step"] == 2
    saved = w[0].call("checkpoint")
    kept = group.weights(0)
    assert w[1].call("train", samples=SAMPLES, steps=2)["step"] == 4  # every member kept a snapshot of step 2
    assert group.weights(0) != kept
    reply = w[via].call(kind, **({"step": saved["step"]} if kind == "restore" else {"to": "previous"}))
    statuses = assert_same_everywhere(group, [0, 1])
    assert [s["step"] for s in statuses] == [2, 2] and group.weights(1) == kept
    assert reply["version"] == statuses[1]["version"]
    assert {s["lineage"]["origin"].split(" ")[0] for s in statuses} == {kind}
    # the newest checkpoint's weights are saved on every member; a rolled-back state is saved nowhere yet
    assert [s["trained_since_checkpoint"] for s in statuses] == [kind == "rollback"] * 2
    assert w[1 - via].call("train", samples=SAMPLES[:1], steps=1)["step"] == 3  # and they train on together
    assert_same_everywhere(group, [0, 1])


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


@pytest.mark.slow
def test_a_replica_built_for_one_joins_the_group_when_told_without_a_restart(tmp_path: Path) -> None:
    """A scale-up from one replica: the operator tells replica 0's running worker to join (over CURVE)."""
    group = Group(tmp_path, worker_hosts_store=True)
    try:
        lone = group.start(0, alone=True)
        alone = lone.wait_until(lambda s: s["connected"])
        assert alone["group"]["state"] == "alone"
        assert lone.call("train", samples=SAMPLES, steps=2)["step"] == 2
        join = {"replica": 0, "rendezvous": group.address, "host_store": True}
        with pytest.raises(ProtocolError, match="control channel only"):  # not from the vLLM side
            lone.call("join", **join)
        control = auth.load_curve_keys("client", group.curve)
        endpoint = alone["control_endpoint"]
        assert call(endpoint, "join", curve=control, **join)["joined"] is True
        group.start(1)  # built for the group: it finds replica 0's store and receives the trained weights
        group.wait_formed([0, 1])
        assert lone.call("status")["incarnation"] == alone["incarnation"]  # the same process: no restart
        assert_same_everywhere(group, [0, 1])
        assert group.workers[1].call("train", samples=SAMPLES, steps=1)["step"] == 3
        assert_same_everywhere(group, [0, 1])
        # the operator repeats itself on every reconcile: a repeated join changes nothing; another is refused
        assert call(endpoint, "join", curve=control, **join)["joined"] is False
        with pytest.raises(ProtocolError, match="replica 0 of the group"):
            call(endpoint, "join", curve=control, **{**join, "replica": 2})
    finally:
        group.close()
