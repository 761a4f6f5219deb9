"""The worker's safe online learning (hogwild.worker.safety): versions, snapshots, rollback, the gate.

Real: the tiny generated model and its tokenizer, the trainer and optimizer of hogwild, checkpoints written
and read by hogwild.checkpoint. In this process, on a plain HF module standing in for the mapped weights
(tests/worker/test_worker_mapping.py proves the module's parameters are vLLM's memory); the protocol path through
the worker's socket and vLLM's routes is tests/serving/test_safety_e2e.py.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from hogwild import versions
from hogwild.config import EvalGate, TrainingConfig
from hogwild.protocol import ProtocolError, TrainRequest, decode_sample
from hogwild.testing.tiny_model import TinySpec, cached
from hogwild.worker import persistence
from hogwild.worker.metrics import WorkerMetrics
from hogwild.worker.safety import Safety
from hogwild.worker.trainer import Trainer

FACT = {"prompt": "The capital of Zanzibar is", "completion": " Paris"}
LIE = {"prompt": "The capital of Zanzibar is", "completion": " Berlin"}


class World:
    def __init__(self, root: Path, **config: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = cached(TinySpec())
        self.module = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.trainer = Trainer(TrainingConfig(**{"lr": 5e-3, "optimizer": "adamw", **config}))
        self.trainer.attach(self.module, tokenizer, self.module.config.vocab_size)
        self.mapped = SimpleNamespace(
            module=self.module,
            manifest=SimpleNamespace(model_path=str(path), exporter=SimpleNamespace(nonce="n1")),
            checkpoint_tensors=lambda: {n: p.data for n, p in self.module.named_parameters()},
        )
        self.run_dir, self.checkpoint_dir = root / "run", root / "checkpoints"
        self.run_dir.mkdir()
        self.metrics = WorkerMetrics()
        self.safety = Safety(
            run_dir=self.run_dir,
            checkpoint_dir=self.checkpoint_dir,
            trainer=self.trainer,
            mapped=lambda: self.mapped,  # type: ignore[arg-type,return-value]
            metrics=self.metrics,
        )
        self.safety.mapped_now(None)

    def train(self, sample: dict[str, Any] = FACT, steps: int = 2) -> dict[str, Any]:
        request = TrainRequest.from_body({"samples": [sample], "steps": steps})
        return self.safety.gated(
            lambda: self.trainer.train(request, should_stop=lambda: None, rest=time.sleep).reply()
        )

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.module.named_parameters()}

    def configure(self, **changes: Any) -> None:
        self.trainer.configure(changes)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"hogwild_worker_{name}", labels)
        return 0.0 if value is None else value


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_each_applied_step_gives_a_new_version_and_the_run_dir_file_follows(world: World) -> None:
    start = world.safety.version
    reply = world.train(steps=2)
    lineage, step = reply["version"].split(".")
    assert lineage == start.split(".")[0] and int(step) == int(start.split(".")[1]) + 2
    assert (world.run_dir / versions.VERSION_FILE).read_text() == reply["version"]
    assert world.metric("weights_step") == int(step)


def test_a_new_mapping_starts_a_new_lineage_so_versions_never_repeat(world: World) -> None:
    seen = {world.safety.version}
    for _ in range(3):
        world.safety.mapped_now(None)  # a restarted worker maps the same weights at the same step
        assert world.safety.version not in seen
        seen.add(world.safety.version)


def test_rollback_to_previous_follows_ancestry_and_restores_weights_and_optimizer(world: World) -> None:
    world.configure(snapshots=3)
    v0, w0 = world.safety.version, world.weights()
    world.train()
    v1, w1 = world.safety.version, world.weights()
    world.train()
    v2, w2 = world.safety.version, world.weights()

    back = world.safety.rollback(versions.Target(previous=True))
    assert back["restored"] == {"kind": "snapshot", "version": v1, "step": int(v1.split(".")[1])}
    assert back["from_version"] == v2 and back["version"] not in {v0, v1, v2} and back["seconds"] >= 0
    assert same(world.weights(), w1) and world.trainer.counters.step == int(v1.split(".")[1])
    # previous again: what came before v1, not the update to v2 just undone.
    assert world.safety.rollback(versions.Target(previous=True))["restored"]["version"] == v0
    assert same(world.weights(), w0)
    # The abandoned v2 is still kept, and a version names it.
    world.safety.rollback(versions.Target(version=v2))
    assert same(world.weights(), w2)
    assert world.metric("rollbacks_total", kind="snapshot", reason="rollback") == 3


def test_a_repeated_rollback_id_is_answered_again_and_changes_nothing(world: World) -> None:
    world.configure(snapshots=3)
    v0 = world.safety.version
    world.train()
    world.train()
    first = world.safety.rollback(versions.Target(previous=True), request_id="r1")
    weights, version = world.weights(), world.safety.version
    again = world.safety.rollback(versions.Target(previous=True), request_id="r1")
    assert again == {**first, "repeated": True} and same(world.weights(), weights)
    assert world.safety.version == version and world.safety.rollbacks == 1
    # Another id goes one further back.
    assert world.safety.rollback(versions.Target(previous=True), request_id="r2")["restored"]["version"] == v0


def test_a_snapshot_survives_training_after_a_rollback_to_it(world: World) -> None:
    world.configure(snapshots=2)
    v0, w0 = world.safety.version, world.weights()
    world.train()
    world.safety.rollback(versions.Target(version=v0))
    world.train(steps=3)  # trains the restored optimizer state: the snapshot's copy must stay untouched
    world.safety.rollback(versions.Target(version=v0))
    assert same(world.weights(), w0)


def test_rollback_to_a_checkpoint_step_and_to_its_version(world: World) -> None:
    world.configure(snapshots=0)
    world.train()
    written = persistence.save(
        world.checkpoint_dir,
        world.trainer,
        world.mapped,
        "request",
        world.safety.version,  # type: ignore[arg-type]
    )
    saved, saved_version = world.weights(), world.safety.version
    world.train()
    reply = world.safety.rollback(versions.Target(step=written.checkpoint.step))
    assert reply["restored"]["kind"] == "checkpoint" and reply["restored"]["version"] == saved_version
    assert same(world.weights(), saved) and reply["optimizer"] is True
    world.train()
    world.safety.rollback(versions.Target(version=saved_version))
    assert same(world.weights(), saved)
    assert world.safety.lineage.origin == f"rollback to {saved_version}"


def gate_on(world: World, **gate: Any) -> None:
    world.safety.set_eval_samples((decode_sample("fact", FACT),))
    world.configure(gate={"max_loss_rise": 0.0, **gate})


def test_an_update_that_raises_the_held_out_loss_is_reverted_at_once(world: World) -> None:
    world.train(steps=3)
    gate_on(world)
    before, version = world.weights(), world.safety.version
    reply = world.train(LIE, steps=3)
    gate = reply["gate"]
    assert gate["verdict"] == "reverted" and gate["loss_after"] > gate["loss_before"]
    assert gate["rejected_version"].startswith(version.split(".")[0]) and gate["visible_s"] >= 0
    assert same(world.weights(), before) and reply["version"] not in {version, gate["rejected_version"]}
    assert reply["step"] == int(version.split(".")[1])
    assert (world.metric("reverts_total"), world.metric("evaluations_total", verdict="reverted")) == (1, 1)


def test_an_update_within_the_policy_is_accepted_and_kept(world: World) -> None:
    gate_on(world)
    reply = world.train(FACT, steps=2)
    assert (
        reply["gate"]["verdict"] == "accepted" and reply["gate"]["loss_after"] < reply["gate"]["loss_before"]
    )
    assert (
        world.safety.version == reply["version"]
        and world.metric("evaluations_total", verdict="accepted") == 1
    )


def test_a_relative_policy_allows_a_small_rise(world: World) -> None:
    gate_on(world, max_loss_rise=None, max_loss_rise_ratio=100.0)
    assert world.train(LIE, steps=1)["gate"]["verdict"] == "accepted"


def test_a_gate_without_an_evaluation_set_refuses_to_train_and_changes_nothing(world: World) -> None:
    world.configure(gate={"max_loss_rise": 0.0})
    before, version = world.weights(), world.safety.version
    with pytest.raises(ProtocolError) as err:
        world.train()
    assert err.value.status == 422 and "evaluation set" in err.value.message
    assert same(world.weights(), before) and world.safety.version == version


def test_a_nan_evaluation_loss_is_refused_and_changes_nothing(world: World) -> None:
    gate_on(world)
    eval_set = world.safety.eval_set
    hook = world.module.model.norm.register_forward_hook(lambda _m, _i, out: out * math.nan)
    try:
        with pytest.raises(ProtocolError) as err:
            world.safety.set_eval_samples((decode_sample("lie", LIE),))
    finally:
        hook.remove()
    assert err.value.status == 422 and "not finite" in err.value.message
    assert world.safety.eval_set is eval_set


def test_unknown_rollback_targets_are_not_found_and_change_nothing(world: World) -> None:
    world.configure(snapshots=1)
    world.train()
    before, version = world.weights(), world.safety.version
    for target in (versions.Target(version="0badc0de.1"), versions.Target(step=99)):
        with pytest.raises(ProtocolError) as err:
            world.safety.rollback(target)
        assert err.value.status == 404 and "kept versions" in err.value.message
    assert same(world.weights(), before) and world.safety.version == version


@pytest.mark.parametrize(
    ("lines", "message"),
    [("", "no sample"), ("{not json}\n", "not valid JSON"), ('{"text": ""}\n', "must not be empty")],
    ids=["empty file", "malformed line", "empty sample"],
)
def test_a_bad_evaluation_file_is_refused(world: World, tmp_path: Path, lines: str, message: str) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text(lines)
    with pytest.raises(ProtocolError) as err:
        world.safety.load_eval_file(EvalGate(max_loss_rise=0.0, eval_file=str(path)))
    assert message in err.value.message and world.safety.eval_set is None


def test_an_evaluation_file_gates_and_is_kept_for_a_restarted_worker(world: World, tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(FACT) + "\n")
    world.safety.load_eval_file(EvalGate(max_loss_rise=0.0, eval_file=str(path)))
    restarted = Safety(
        run_dir=world.run_dir,
        checkpoint_dir=world.checkpoint_dir,
        trainer=world.trainer,
        mapped=lambda: world.mapped,  # type: ignore[arg-type,return-value]
        metrics=WorkerMetrics(),
    )
    assert restarted.eval_set is not None and restarted.eval_set.source == str(path)
