"""Checkpoints: the layout, atomic writes, keep-K, loading by transformers, restore in place, crash safety.

Real: the checkpoint code writing real files (safetensors, torch.save) from weights mapped out of a shared
file exactly as the worker maps vLLM's, transformers loading the result as a model directory, and, for the
crash tests, a real exporter process and real worker processes killed by SIGKILL at a named point
(HOGWILD_FAULT) or from outside, then restarted. Choosing and pruning are pure and tested with tables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hogwild import checkpoint
from hogwild.checkpoint import Checkpoint
from hogwild.testing.exporter import export, load_vllm_params
from hogwild.testing.tiny_model import TinySpec, cached
from hogwild.worker.model import MappedModel, map_model
from worker_helpers import FACT, Pod


# ---- pure: names, choosing, pruning, sharding ------------------------------------------------------------
def ckpt(step: int, time: float) -> Checkpoint:
    return Checkpoint(Path(f"/c/{checkpoint.checkpoint_name(step)}"), step, time, {})


@pytest.mark.parametrize(
    ("step", "name"), [(0, "step-00000000"), (42, "step-00000042"), (10**8 - 1, "step-99999999")]
)
def test_checkpoint_names_have_eight_digits(step: int, name: str) -> None:
    assert checkpoint.checkpoint_name(step) == name


@pytest.mark.parametrize(
    ("times", "keep", "pruned"),
    [
        pytest.param([1, 2, 3], 3, [], id="at-the-limit"),
        pytest.param([1, 2, 3, 4, 5], 2, [1, 2, 3], id="oldest-go"),
        pytest.param([1, 2], 0, [1], id="keep-at-least-one"),
    ],
)
def test_prune_keeps_the_newest(times: list[int], keep: int, pruned: list[int]) -> None:
    checkpoints = [ckpt(t * 10, t) for t in times]
    assert [c.time for c in checkpoint.prune_plan(checkpoints, keep)] == pruned


@pytest.mark.parametrize(
    ("sizes", "limit", "shards"),
    [
        pytest.param([4, 4, 4], 100, [["a", "b", "c"]], id="one-shard"),
        pytest.param([4, 4, 4], 8, [["a", "b"], ["c"]], id="two-shards"),
        pytest.param([20, 4], 8, [["a"], ["b"]], id="big-tensor-alone"),
    ],
)
def test_shard_plan(sizes: list[int], limit: int, shards: list[list[str]]) -> None:
    assert checkpoint.shard_plan(dict(zip("abc", sizes, strict=False)), limit) == shards


def fake_checkpoint(root: Path, name: str, meta: dict[str, Any] | None) -> None:
    (root / name).mkdir(parents=True)
    if meta is not None:
        (root / name / "meta.json").write_text(json.dumps({"format": checkpoint.FORMAT, **meta}))


def test_only_complete_checkpoints_are_listed_newest_by_time(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, "step-00000005", {"step": 5, "time": 100.0})
    fake_checkpoint(tmp_path, "step-00000009", {"step": 9, "time": 50.0})  # older: before a rollback
    fake_checkpoint(tmp_path, "step-00000012", None)  # no meta.json: incomplete
    fake_checkpoint(tmp_path, "step-00000013", {"step": 14, "time": 200.0})  # meta of another step
    fake_checkpoint(tmp_path, ".tmp-step-00000020-7", {"step": 20, "time": 300.0})  # a temp name
    fake_checkpoint(tmp_path, "model", {"step": 1, "time": 400.0})
    assert [c.step for c in checkpoint.list_complete(tmp_path)] == [9, 5]
    newest = checkpoint.newest_complete(tmp_path)
    assert newest is not None and newest.step == 5


def test_no_checkpoint_dir_means_no_checkpoint(tmp_path: Path) -> None:
    assert checkpoint.newest_complete(tmp_path / "missing") is None


# ---- writing and restoring, in process ------------------------------------------------------------------
class Mapped:
    def __init__(self, run_dir: Path, family: str = "qwen2", tied: bool = True) -> None:
        self.model_dir = cached(TinySpec(family=family, tied=tied))
        self.params, hf_config = load_vllm_params(str(self.model_dir), "cpu")
        self.manifest = export(self.params, str(self.model_dir), str(run_dir), hf_config)
        self.mapped: MappedModel = map_model(self.manifest)

    def write(self, root: Path, step: int, **kwargs: Any) -> checkpoint.Written:
        return checkpoint.write(
            root,
            step=step,
            weights=self.mapped.checkpoint_tensors(),
            optimizer_state={"format": 1, "counters": {"step": step}, "moment": torch.ones(3)},
            model_dir=str(self.model_dir),
            meta={"reason": "test"},
            **kwargs,
        )

    def logits(self, module: Any) -> torch.Tensor:
        with torch.no_grad():
            return module(input_ids=torch.tensor([[3, 14, 15, 92, 65]])).logits


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def mapped(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mapped]:
    setup = Mapped(tmp_path / "run", tied=request.param)
    yield setup
    os.unlink(setup.manifest.payload)


def test_the_layout(mapped: Mapped, tmp_path: Path) -> None:
    written = mapped.write(tmp_path / "ckpt", 7)
    path = tmp_path / "ckpt" / "step-00000007"
    names = {p.name for p in path.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    assert {"optimizer.pt", "meta.json"} <= names
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["step"], meta["reason"], meta["files"]["model.safetensors"]) == (
        7,
        "test",
        (path / "model.safetensors").stat().st_size,
    )
    assert written.bytes == sum(p.stat().st_size for p in path.iterdir())
    state = torch.load(path / "optimizer.pt", weights_only=True)
    assert torch.equal(state["moment"], torch.ones(3))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-00000007"]  # no temp dir left


@pytest.mark.parametrize(
    "shard_bytes", [checkpoint.DEFAULT_SHARD_BYTES, 200_000], ids=["one-file", "sharded"]
)
def test_transformers_loads_a_checkpoint_as_a_model_directory(
    mapped: Mapped, tmp_path: Path, shard_bytes: int
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with torch.no_grad():  # make the checkpoint differ from the base model
        mapped.mapped.module.model.layers[0].mlp.up_proj.weight.mul_(-1.5)
    written = mapped.write(tmp_path, 3, max_shard_bytes=shard_bytes)
    files = checkpoint.weight_files(written.checkpoint)
    assert (len(files) > 1) == (shard_bytes < checkpoint.DEFAULT_SHARD_BYTES)
    loaded = AutoModelForCausalLM.from_pretrained(written.checkpoint.path)
    assert torch.equal(mapped.logits(loaded), mapped.logits(mapped.mapped.module))
    assert AutoTokenizer.from_pretrained(written.checkpoint.path)("the cat")["input_ids"]


def test_keep_k(mapped: Mapped, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    for step in range(1, 6):
        mapped.write(root, step)
        checkpoint.prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000005"]


def test_a_checkpoint_of_the_same_step_replaces_the_old_one(mapped: Mapped, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    first = mapped.write(root, 4)
    second = mapped.write(root, 4)
    assert (
        [c.time for c in checkpoint.list_complete(root)]
        == [second.checkpoint.time]
        != [first.checkpoint.time]
    )
    assert [p.name for p in root.iterdir()] == ["step-00000004"]


def test_restore_copies_into_the_served_tensors_in_place(mapped: Mapped, tmp_path: Path) -> None:
    written = mapped.write(tmp_path, 1)
    served = mapped.params["model.layers.0.mlp.gate_up_proj.weight"]  # the exporter's own tensor
    saved, pointer = served.detach().clone(), served.data_ptr()
    with torch.no_grad():
        mapped.mapped.module.model.layers[0].mlp.gate_proj.weight.add_(1.0)
    assert not torch.equal(served, saved)
    copied = checkpoint.load_weights_into(written.checkpoint, mapped.mapped.checkpoint_tensors())
    assert torch.equal(served, saved) and served.data_ptr() == pointer
    assert copied == sum(t.numel() * t.element_size() for t in mapped.mapped.checkpoint_tensors().values())


def test_a_checkpoint_that_does_not_fit_changes_nothing(mapped: Mapped, tmp_path: Path) -> None:
    written = mapped.write(tmp_path, 1)
    other = {**mapped.mapped.checkpoint_tensors(), "model.layers.9.extra.weight": torch.zeros(2)}
    before = {n: t.clone() for n, t in other.items()}
    with torch.no_grad():
        mapped.mapped.module.model.norm.weight.add_(1.0)
    before = {n: t.clone() for n, t in other.items()}
    with pytest.raises(checkpoint.CheckpointError, match="lacks 1 weights"):
        checkpoint.load_weights_into(written.checkpoint, other)
    assert all(torch.equal(before[n], t) for n, t in other.items())


# ---- crash safety, with real processes --------------------------------------------------------------------
def train_and_checkpoint(worker: Any, steps: int) -> dict[str, Any]:
    worker.call("train", samples=[FACT], steps=steps)
    return worker.call("checkpoint")


@pytest.mark.parametrize(
    "fault", ["checkpoint.after_weights", "checkpoint.after_optimizer", "checkpoint.before_rename"]
)
def test_kill_9_mid_checkpoint_leaves_the_previous_one_whole(pod: Pod, fault: str) -> None:
    from transformers import AutoModelForCausalLM

    worker = pod.worker(config={"lr": 1e-2}, env={"HOGWILD_FAULT": f"{fault}:2"})
    worker.wait_connected()
    first = train_and_checkpoint(worker, 2)
    worker.call("train", samples=[FACT], steps=1)
    pending = worker.post("checkpoint")
    assert worker.proc.wait(60) == -9  # the worker SIGKILLed itself while writing this checkpoint
    assert pending.raw_result(wait_s=0) is None
    newest = checkpoint.newest_complete(pod.checkpoint_dir)
    assert newest is not None and str(newest.path) == first["path"]
    assert any(p.name.startswith(".tmp-") for p in pod.checkpoint_dir.iterdir())  # the torn write is there...
    AutoModelForCausalLM.from_pretrained(newest.path)  # ...and the previous checkpoint loads


def test_a_restarted_worker_resumes_the_newest_optimizer_state(pod: Pod) -> None:
    worker = pod.worker(config={"lr": 1e-2})
    worker.wait_connected()
    saved = train_and_checkpoint(worker, 3)
    state_bytes = worker.call("status")["optimizer_state_bytes"]
    saved_state = torch.load(Path(saved["path"]) / "optimizer.pt", weights_only=True)
    worker.call("train", samples=[FACT], steps=2)  # trained past the checkpoint, then killed
    worker.kill()
    torn = pod.checkpoint_dir / ".tmp-step-00000009-12345"  # as a kill mid-checkpoint leaves it
    torn.mkdir()

    restarted = pod.worker(config={"lr": 1e-2})
    status = restarted.wait_connected()
    assert not torn.exists()  # swept on start
    assert (status["step"], status["optimizer_state_bytes"]) == (3, state_bytes)
    assert status["trained_since_checkpoint"] is True  # vLLM still serves the 2 unsaved steps
    again = restarted.call("checkpoint")  # the same step: written from the state it resumed
    resumed_state = torch.load(Path(again["path"]) / "optimizer.pt", weights_only=True)
    for saved_param, resumed_param in zip(
        saved_state["optimizer"]["state"].values(), resumed_state["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(saved_param["exp_avg"], resumed_param["exp_avg"])
    assert restarted.call("train", samples=[FACT], steps=1)["step"] == 4


def test_sigterm_writes_a_final_checkpoint_only_when_something_is_unsaved(pod: Pod) -> None:
    worker = pod.worker()
    worker.wait_connected()
    worker.call("train", samples=[FACT], steps=2)
    assert worker.terminate() == 0
    newest = checkpoint.newest_complete(pod.checkpoint_dir)
    assert newest is not None and (newest.step, newest.meta["reason"]) == (2, "shutdown")

    idle = pod.worker()
    assert idle.wait_connected()["trained_since_checkpoint"] is False
    assert idle.terminate() == 0
    assert checkpoint.list_complete(pod.checkpoint_dir) == [newest]


def test_checkpoints_are_written_on_the_interval(pod: Pod) -> None:
    worker = pod.worker(config={"checkpoint_interval_s": 0.2})
    worker.wait_connected()
    assert worker.call("status")["last_checkpoint"] is None  # nothing trained, nothing to save
    worker.call("train", samples=[FACT], steps=1)
    status = worker.wait_until(lambda s: s["last_checkpoint"] is not None)
    newest = checkpoint.newest_complete(pod.checkpoint_dir)
    assert newest is not None and (newest.step, newest.meta["reason"]) == (1, "interval")
    assert status["trained_since_checkpoint"] is False
