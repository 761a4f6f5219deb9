"""Safe online learning through the TrainingSession: the product's `hogwild operator` (as the chart runs it)
against kopf's kmock emulator, relaying to a real `hogwild worker` that maps a stand-in exporter's weights.

The gate's policy and its evaluation set (from a ConfigMap) reach the worker; the status shows the version
the worker serves; a revert by the gate is an Event; spec.rollback is relayed once per id, answered in
status.rollback and an Event, and a rollback the worker cannot do is recorded as Failed, not retried.
The pure parts (parsing, records, Events) are tables at the end.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
from test_operator_flows import operator, point_at, secret_keys, wait_events, wait_status

from hogwild.operator import pod_builder, safety
from hogwild.operator.fields import SpecError
from hogwild.operator.spec import parse_spec
from hogwild.protocol import ProtocolError
from hogwild.testing.emulator import Emulator
from hogwild.testing.exporter import ExporterProcess
from hogwild.testing.tiny_model import cached
from hogwild.testing.worker_process import WorkerProcess
from operator_helpers import EmulatorCluster, session_manifest

pytestmark = pytest.mark.timeout(300)
FACT = {"prompt": "The capital of Zanzibar is", "completion": " Paris"}
LIE = {"prompt": "The capital of Zanzibar is", "completion": " Berlin"}
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[EmulatorCluster]:
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        yield EmulatorCluster(emulator, str(server.url), scope="namespaces", kubeconfig_dir=tmp_path)


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[ExporterProcess]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    process = ExporterProcess(cached(), run_dir, env=ENV)
    try:
        yield process
    finally:
        process.close()


async def test_gate_versions_and_rollback_through_the_resource(
    cluster: EmulatorCluster, exporter: ExporterProcess, tmp_path: Path
) -> None:
    gate = {"maxLossRise": 0, "evalConfigMap": {"name": "facts"}}
    manifest = session_manifest(
        "chat", cluster.namespace, training={"lr": 5e-3, "snapshots": 3, "gate": gate}
    )
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "facts", "namespace": cluster.namespace},
        "data": {"eval.jsonl": json.dumps(FACT) + "\n"},
    }
    async with operator(cluster):
        await cluster.create(config_map)
        await cluster.create(manifest)
        keys = await secret_keys(cluster, "chat")
        curve_dir = tmp_path / "curve"
        curve_dir.mkdir()
        for name in pod_builder.WORKER_CURVE_FILES:
            (curve_dir / name).write_bytes(keys[name])
        worker = WorkerProcess(exporter.run_dir, tmp_path / "checkpoints", curve_dir=curve_dir, env=ENV)
        try:
            ready = worker.wait_connected(timeout_s=120)
            await point_at(cluster, "chat", ready["control_endpoint"])
            await cluster.mark_running("chat")
            await wait_events(cluster, "chat", {("Normal", "Configured")})
            status = await asyncio.to_thread(
                worker.wait_until, lambda s: s["gate"]["enabled"] and s["gate"]["eval_set"]
            )
            assert status["gate"]["eval_set"]["samples"] == 1 and status["config"]["snapshots"] == 3

            taught = worker.call("train", samples=[FACT], steps=2)
            assert taught["gate"]["verdict"] == "accepted"
            await wait_status(
                cluster, "chat", "the taught version", lambda s: s.get("weightsVersion") == taught["version"]
            )
            reverted = worker.call("train", samples=[LIE], steps=3)
            assert reverted["gate"]["verdict"] == "reverted"
            status = await wait_status(
                cluster, "chat", "one revert", lambda s: (s.get("gate") or {}).get("reverts") == 1
            )
            assert (
                status["weightsVersion"] == reverted["version"]
                and "reverted" in status["gate"]["lastVerdict"]
            )
            await wait_events(cluster, "chat", {("Warning", "Reverted")})

            await cluster.patch(
                "TrainingSession", "chat", {"spec": {"rollback": {"id": "r1", "to": "previous"}}}
            )
            status = await wait_status(
                cluster, "chat", "rollback r1", lambda s: (s.get("rollback") or {}).get("id") == "r1"
            )
            assert status["rollback"]["result"] == "Succeeded", status["rollback"]
            assert worker.call("status")["version"] == status["rollback"]["version"]
            await wait_events(cluster, "chat", {("Normal", "RolledBack")})
            # The same id again (another field changed): not repeated.
            await cluster.patch("TrainingSession", "chat", {"spec": {"training": {"lr": 4e-3}}})
            await wait_status(cluster, "chat", "lr relayed", lambda s: s.get("observedGeneration") == 3)
            assert worker.call("status")["rollbacks"] == 1

            await cluster.patch(
                "TrainingSession", "chat", {"spec": {"rollback": {"id": "r2", "to": "0badc0de.1"}}}
            )
            status = await wait_status(
                cluster, "chat", "rollback r2", lambda s: (s.get("rollback") or {}).get("id") == "r2"
            )
            assert status["rollback"]["result"] == "Failed" and "not_found" in status["rollback"]["message"]
            await wait_events(cluster, "chat", {("Warning", "RollbackFailed")})

            # A new pod's worker holds no evaluation set (its run dir is new): the operator relays it again.
            worker.close()
            (exporter.run_dir / "eval-set.json").unlink()
            worker = WorkerProcess(exporter.run_dir, tmp_path / "checkpoints", curve_dir=curve_dir, env=ENV)
            ready = worker.wait_connected(timeout_s=120)
            assert ready["gate"]["eval_set"] is None
            await point_at(cluster, "chat", ready["control_endpoint"])
            # In a thread: the emulator serves the operator from this event loop.
            status = await asyncio.to_thread(
                worker.wait_until, lambda s: s["gate"]["eval_set"] is not None, 60
            )
            assert (
                status["gate"]["eval_set"]["digest"]
                == safety.eval_samples_of(config_map, safety.ConfigMapRef("facts"))[1]
            )
        finally:
            worker.close()


# ---- the pure parts --------------------------------------------------------------------------------------
MODEL = {"model": {"path": "/models/m"}}
SPECS = {
    "no rollback": ({}, None, None),
    "rollback to previous": (
        {"rollback": {"id": "a", "to": "previous"}},
        safety.RollbackSpec("a", "previous"),
        None,
    ),
    "rollback to a step": ({"rollback": {"id": "a", "to": "12"}}, safety.RollbackSpec("a", "12"), None),
    "eval ConfigMap": (
        {"training": {"gate": {"maxLossRise": 0, "evalConfigMap": {"name": "f"}}}},
        None,
        safety.ConfigMapRef("f", "eval.jsonl"),
    ),
}


@pytest.mark.parametrize(("extra", "rollback", "ref"), SPECS.values(), ids=SPECS.keys())
def test_spec_parsing(
    extra: dict[str, Any], rollback: safety.RollbackSpec | None, ref: safety.ConfigMapRef | None
) -> None:
    spec = parse_spec({**MODEL, **extra})
    assert (spec.rollback, spec.eval_config_map) == (rollback, ref)


def test_the_gate_maps_onto_the_workers_config_without_the_configmap() -> None:
    spec = parse_spec(
        {**MODEL, "training": {"gate": {"maxLossRiseRatio": 0.1, "evalConfigMap": {"name": "f"}}}}
    )
    assert spec.training.gate.max_loss_rise_ratio == 0.1 and spec.training.gate.eval_file == ""


BAD_SPECS = {
    "rollback without id": {"rollback": {"to": "previous"}},
    "rollback to nonsense": {"rollback": {"id": "a", "to": "latest"}},
    "two evaluation sets": {"training": {"gate": {"evalFile": "/e.jsonl", "evalConfigMap": {"name": "f"}}}},
    "unknown gate field": {"training": {"gate": {"maxLoss": 1}}},
}


@pytest.mark.parametrize("extra", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_specs_name_the_field(extra: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        parse_spec({**MODEL, **extra})


CONFIG_MAPS = {
    "missing": (None, "does not exist"),
    "no key": ({"data": {}}, "no samples"),
    "blank": ({"data": {"eval.jsonl": "\n\n"}}, "no samples"),
    "not JSON": ({"data": {"eval.jsonl": "{x\n"}}, "not valid JSON"),
    "not a sample": ({"data": {"eval.jsonl": '{"foo": 1}\n'}}, "shapes"),
}


@pytest.mark.parametrize(("config_map", "message"), CONFIG_MAPS.values(), ids=CONFIG_MAPS.keys())
def test_a_bad_evaluation_configmap_says_what_is_wrong(
    config_map: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        safety.eval_samples_of(config_map, safety.ConfigMapRef("f"))


def test_the_worker_and_the_operator_agree_on_a_sets_digest() -> None:
    from hogwild.worker.evaluation import EvalSet

    samples, digest = safety.eval_samples_of(
        {"data": {"eval.jsonl": json.dumps(FACT)}}, safety.ConfigMapRef("f")
    )
    reply = {"gate": {"eval_set": EvalSet(samples, "api").summary()}}
    assert safety.worker_eval_digest(reply) == digest and safety.worker_eval_digest({}) is None


def test_the_evaluation_set_hash_follows_its_content() -> None:
    ref = safety.ConfigMapRef("f")
    one = safety.eval_samples_of({"data": {"eval.jsonl": json.dumps(FACT)}}, ref)
    two = safety.eval_samples_of({"data": {"eval.jsonl": json.dumps(LIE)}}, ref)
    assert len(one[0]) == 1 and one[1] != two[1]


DUE = {
    "no request": (None, {}, False),
    "new id": (safety.RollbackSpec("b", "previous"), {"rollback": {"id": "a"}}, True),
    "same id": (safety.RollbackSpec("a", "previous"), {"rollback": {"id": "a"}}, False),
    "first ever": (safety.RollbackSpec("a", "previous"), {}, True),
}


@pytest.mark.parametrize(("spec", "status", "due"), DUE.values(), ids=DUE.keys())
def test_a_rollback_is_due_once_per_id(
    spec: safety.RollbackSpec | None, status: dict[str, Any], due: bool
) -> None:
    assert safety.rollback_due(spec, status) is due


@pytest.mark.parametrize(
    ("code", "final"), [("not_found", True), ("invalid", True), ("busy", False), ("not_connected", False)]
)
def test_only_impossible_rollbacks_are_final(code: str, final: bool) -> None:
    assert safety.rollback_is_final(ProtocolError(code, "x")) is final


EVENTS = {
    "first observation": ({}, {"gate": {"reverts": 2}}, []),
    "no change": ({"gate": {"reverts": 1}}, {"gate": {"reverts": 1}}, []),
    "a revert": (
        {"gate": {"reverts": 1}},
        {"gate": {"reverts": 2, "lastVerdict": "reverted: x"}},
        ["Reverted"],
    ),
    "worker restarted": ({"gate": {"reverts": 3}}, {"gate": {"reverts": 0}}, []),
}


@pytest.mark.parametrize(("previous", "new", "reasons"), EVENTS.values(), ids=EVENTS.keys())
def test_a_revert_is_an_event(previous: dict[str, Any], new: dict[str, Any], reasons: list[str]) -> None:
    assert [e[1] for e in safety.safety_events(previous, new)] == reasons


def test_the_status_shows_what_the_worker_said() -> None:
    reply = {
        "version": "3fa2c901.12",
        "lineage": {"id": "3fa2c901", "origin": "rollback to 11111111.12", "parent": "11111111.12"},
        "gate": {
            "evaluations": 4,
            "reverts": 1,
            "last": {"verdict": "reverted", "loss_before": 1.0, "loss_after": 1.5, "rejected_version": "x.1"},
        },
    }
    assert safety.safety_status(reply) == {
        "weightsVersion": "3fa2c901.12",
        "lineage": "rollback to 11111111.12",
        "gate": {
            "evaluations": 4,
            "reverts": 1,
            "lastVerdict": "reverted: held-out loss 1 -> 1.5 (x.1 rejected, live None s)",
        },
    }
    assert safety.safety_status({}) == {}
