"""The worker's pure decisions: following the exporter, when to checkpoint, the status reply, fault specs.

Real: the functions themselves; no processes, no files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hogwild.checkpoint import Checkpoint
from hogwild.config import TrainingConfig
from hogwild.faults import parse_faults
from hogwild.handles import ExporterIdentity, Manifest
from hogwild.worker import status
from hogwild.worker.persistence import resume_point
from hogwild.worker.status import DISCONNECT, MAP, NOTHING


def manifest(nonce: str) -> Manifest:
    return Manifest("shm", "/dev/shm/x", ExporterIdentity(1, 2.0, nonce), "/models/m", "bfloat16", (), ())


@pytest.mark.parametrize(
    ("current", "published", "alive", "action"),
    [
        pytest.param(None, None, False, NOTHING, id="waiting-for-weights"),
        pytest.param(None, "a", True, MAP, id="weights-appear"),
        pytest.param(None, "a", False, NOTHING, id="stale-manifest-of-a-dead-exporter"),
        pytest.param("a", "a", True, NOTHING, id="steady"),
        pytest.param("a", "b", True, MAP, id="exporter-restarted"),
        pytest.param("a", "a", False, DISCONNECT, id="exporter-died"),
        pytest.param("a", None, False, DISCONNECT, id="manifest-removed"),
    ],
)
def test_watch_action(current: str | None, published: str | None, alive: bool, action: str) -> None:
    assert status.watch_action(current, manifest(published) if published else None, alive) == action


BASE = {
    "interval_s": 60.0,
    "since_last_s": 61.0,
    "trained_since_checkpoint": True,
    "connected": True,
    "writing": False,
}


@pytest.mark.parametrize(
    ("changes", "due"),
    [
        pytest.param({}, True, id="due"),
        pytest.param({"since_last_s": 59.0}, False, id="too-soon"),
        pytest.param({"trained_since_checkpoint": False}, False, id="nothing-new"),
        pytest.param({"connected": False}, False, id="not-mapped"),
        pytest.param({"writing": True}, False, id="already-writing"),
        pytest.param({"interval_s": 0.0}, False, id="interval-off"),
    ],
)
def test_interval_checkpoint_due(changes: dict[str, Any], due: bool) -> None:
    assert status.interval_checkpoint_due(**{**BASE, **changes}) is due


def test_the_status_reply_carries_the_fields_clients_rely_on() -> None:
    reply = status.status_reply(
        status.StatusInputs(
            connected=True,
            busy=False,
            writing=False,
            step=3,
            tokens_trained=30,
            loss=1.5,
            skipped_steps=1,
            config=TrainingConfig(paused=True),
            last_checkpoint={"step": 3, "path": "/c/step-00000003", "time": 1.0},
            manifest=manifest("n"),
            optimizer="Apollo",
            optimizer_state_bytes=100,
            weight_bytes=1000,
            device="cpu",
            trained_since_checkpoint=False,
            mapping_error=None,
            endpoints={"metrics_port": 9400},
        )
    )
    for field in ("connected", "paused", "busy", "step", "tokens_trained", "loss", "skipped_steps"):
        assert field in reply
    assert (reply["paused"], reply["exporter"]["nonce"], reply["metrics_port"]) == (True, "n", 9400)
    assert reply["config"]["paused"] is True and reply["last_checkpoint"]["step"] == 3


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        pytest.param("", {}, id="none"),
        pytest.param("checkpoint.after_weights", {"checkpoint.after_weights": 1}, id="first-hit"),
        pytest.param("a:3, b", {"a": 3, "b": 1}, id="nth-hit-and-list"),
        pytest.param("a:zero", {"a": 1}, id="bad-count-means-first"),
    ],
)
def test_fault_specs(spec: str, parsed: dict[str, int]) -> None:
    assert parse_faults(spec) == parsed


def ckpt(step: int, time: float, nonce: str) -> Checkpoint:
    return Checkpoint(Path(f"/ckpt/step-{step:08d}"), step, time, {"exporter_nonce": nonce})


CHECKPOINTS = [ckpt(5, 10.0, "old"), ckpt(9, 20.0, "old"), ckpt(7, 30.0, "now"), ckpt(8, 25.0, "now")]


@pytest.mark.parametrize(
    ("checkpoints", "model_path", "resumed"),
    [
        pytest.param([], "/models/base", None, id="nothing-saved"),
        pytest.param(CHECKPOINTS, "/ckpt/step-00000009", 7, id="newest-written-from-these-weights"),
        pytest.param(CHECKPOINTS[:2], "/ckpt/step-00000005", 5, id="the-one-vllm-loaded"),
        pytest.param(CHECKPOINTS[:2], "/models/base", None, id="vllm-serves-another-model"),
    ],
)
def test_resume_point(checkpoints: list[Checkpoint], model_path: str, resumed: int | None) -> None:
    found = resume_point(checkpoints, "now", model_path)
    assert (found.step if found else None) == resumed
