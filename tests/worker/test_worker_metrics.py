"""The worker's Prometheus metrics move with what it does, scraped over HTTP like Prometheus would.

Real: a worker process training a stand-in exporter's weights, its /metrics endpoint (prometheus-client's
HTTP server), and prometheus-client's own text parser; plus a WorkerMetrics object fed step results directly
for the skipped-step path, which a process cannot be made to hit on demand.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hogwild.config import TrainingConfig
from hogwild.protocol import ProtocolError
from hogwild.testing.worker_process import WorkerProcess
from hogwild.worker.metrics import WorkerMetrics
from hogwild.worker.service import WorkerService, WorkerSettings
from hogwild.worker.trainer import StepStats
from worker_helpers import FACT, Pod


def parse(text: str) -> dict[str, float]:
    """sample name{labels} -> value."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def scrape(worker: WorkerProcess) -> dict[str, float]:
    port = worker.call("status")["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return parse(response.read().decode())


def test_metrics_move_with_training_checkpoints_and_errors(pod: Pod) -> None:
    worker = pod.worker()
    worker.wait_connected()
    before = scrape(worker)
    assert (before["hogwild_worker_connected"], before["hogwild_worker_steps_total"]) == (1.0, 0.0)

    reply = worker.call("train", samples=[FACT], steps=3)
    worker.call("checkpoint")
    worker.call("configure", changes={"paused": True})
    with pytest.raises(ProtocolError):
        worker.call("train", samples=[FACT])
    after = scrape(worker)

    assert after["hogwild_worker_steps_total"] == 3
    assert after["hogwild_worker_tokens_total"] == reply["tokens"]
    assert after["hogwild_worker_loss"] == pytest.approx(reply["loss"])
    assert after["hogwild_worker_step_seconds_count"] == 3
    assert after["hogwild_worker_grad_norm"] > 0 and after["hogwild_worker_update_norm"] > 0
    assert after["hogwild_worker_optimizer_state_bytes"] > 0
    assert after["hogwild_worker_weight_bytes"] > 0
    assert after["hogwild_worker_checkpoint_bytes"] > 0
    assert after['hogwild_worker_checkpoints_total{reason="request"}'] == 1
    assert after["hogwild_worker_last_checkpoint_timestamp"] > 0
    assert after["hogwild_worker_checkpoint_age_seconds"] >= 0
    assert after["hogwild_worker_paused"] == 1
    assert after['hogwild_worker_errors_total{code="busy"}'] == 1
    assert after['hogwild_worker_train_requests_total{result="ok"}'] == 1
    assert after['hogwild_worker_requests_total{type="train"}'] == 2


def test_checkpoint_interval_follows_hot_configure(pod: Pod) -> None:
    """What HogwildCheckpointTooOld compares the unsaved age with: the configured interval, hot changes too."""
    worker = pod.worker(config={"checkpoint_interval_s": 600})
    worker.wait_connected()
    before = scrape(worker)["hogwild_worker_checkpoint_interval_seconds"]
    worker.call("configure", changes={"checkpoint_interval_s": 3600})
    assert (before, scrape(worker)["hogwild_worker_checkpoint_interval_seconds"]) == (600, 3600)


# ---- hogwild_worker_unsaved_since_timestamp_seconds through a sequence of events --------------------------------------
UNSAVED = "hogwild_worker_unsaved_since_timestamp_seconds"
CONFIG = {"checkpoint_interval_s": 3600}  # no interval checkpoint within the test


class Session:
    """One pod's worker, restarted as the events say; `worker` is the one running now."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.worker = pod.worker(config=CONFIG)
        self.worker.wait_connected()

    def step(self) -> None:
        self.worker.call("train", samples=[FACT], steps=1)

    def checkpoint(self) -> None:
        self.worker.call("checkpoint")

    def failed_checkpoint(self) -> None:
        """The checkpoint volume refuses the write (a file where the checkpoint dir should be)."""
        directory = self.pod.checkpoint_dir
        aside = directory.with_name("checkpoints-aside")
        if directory.exists():
            directory.rename(aside)
        directory.write_text("not a directory")
        try:
            with pytest.raises(ProtocolError) as failed:
                self.worker.call("checkpoint")
            assert failed.value.code == "internal"
        finally:
            directory.unlink()
            if aside.exists():
                aside.rename(directory)

    def kill_and_restart(self) -> None:
        """kill -9 (no final checkpoint), then a new worker process on the same run dir: vLLM lives on."""
        self.worker.kill()
        self.worker = self.pod.worker(config=CONFIG)
        self.worker.wait_connected()

    def stop_and_restart(self) -> None:
        """SIGTERM (final checkpoint when something is unsaved), then a new worker process."""
        assert self.worker.terminate() == 0
        self.worker = self.pod.worker(config=CONFIG)
        self.worker.wait_connected()


NEW, SAME = "new", "same"  # set to the event's time; unchanged from the row before
UNSAVED_EVENTS: list[tuple[str, str | float]] = [
    ("connected", 0.0),
    ("step", NEW),
    ("step", SAME),  # the first unsaved step counts, not the newest
    ("failed_checkpoint", SAME),
    ("kill_and_restart", SAME),  # the marker in the run dir outlives the worker process
    ("step", SAME),
    ("checkpoint", 0.0),
    ("kill_and_restart", 0.0),  # resumed from the checkpoint: nothing unsaved until the next step
    ("failed_checkpoint", 0.0),  # a failure with nothing unsaved makes nothing unsaved
    ("step", NEW),
    ("stop_and_restart", 0.0),  # the SIGTERM checkpoint saved it
    ("step", NEW),
    ("checkpoint", 0.0),
]


def test_unsaved_since_follows_steps_checkpoints_and_restarts(pod: Pod) -> None:
    """The gauge HogwildCheckpointTooOld ages, scraped from the worker after each event. A skipped step (not
    finite) cannot be made to happen in a process on demand: test_a_skipped_step_leaves_nothing_unsaved."""
    session = Session(pod)
    seen: list[tuple[str, str | float]] = []
    previous = scrape(session.worker)[UNSAVED]
    seen.append(("connected", previous))
    for event, _ in UNSAVED_EVENTS[1:]:
        started = time.time()
        getattr(session, event)()
        finished = time.time()
        value = scrape(session.worker)[UNSAVED]
        if value and value == previous:
            seen.append((event, SAME))
        elif value and started <= value <= finished:
            seen.append((event, NEW))
        else:
            seen.append((event, value))
        previous = value
    assert seen == UNSAVED_EVENTS


def stats(skipped: bool, step: int = 1) -> StepStats:
    return StepStats(
        step=step,
        loss=float("nan") if skipped else 2.0,
        grad_norm=1.0,
        update_norm=0.5,
        tokens=10,
        targets=5,
        truncated_tokens=0,
        skipped=skipped,
        seconds=0.1,
    )


@pytest.mark.parametrize(
    ("skipped", "expected"),
    [
        pytest.param(False, {"steps": 1.0, "skipped_steps": 0.0, "tokens": 10.0}, id="applied"),
        pytest.param(True, {"steps": 0.0, "skipped_steps": 1.0, "tokens": 0.0}, id="skipped"),
    ],
)
def test_a_step_is_counted_as_applied_or_skipped(skipped: bool, expected: dict[str, float]) -> None:
    metrics = WorkerMetrics()
    metrics.observe_step(stats(skipped))
    values = parse(generate_latest(metrics.registry).decode())
    assert {k: values[f"hogwild_worker_{k}_total"] for k in expected} == expected


@pytest.mark.parametrize(
    ("gate", "on_gpu", "expected"),
    [
        pytest.param(
            None,
            False,
            {"points": 0.0, "holds": 0.0, "held_seconds": 0.0, "gpu": 0.0, "share": 1.0, "floor": 0.0},
            id="no-gate-yet",
        ),
        pytest.param(
            SimpleNamespace(
                points=120,
                waits=7,
                waited_s=0.75,
                gave_up=1,
                share_kept=2,
                training_share=0.12,
                training_share_floor=0.1,
            ),
            True,
            {
                "points": 120.0,
                "holds": 7.0,
                "held_seconds": 0.75,
                "gpu": 1.0,
                "max_wait": 1.0,
                "released_share": 2.0,
                "share": 0.12,
                "floor": 0.1,
            },
            id="waiting-in-the-gpu",
        ),
    ],
)
def test_protection_counts_are_read_from_the_gate(
    gate: Any, on_gpu: bool, expected: dict[str, float]
) -> None:
    metrics = WorkerMetrics()
    if gate is not None:
        metrics.watch_protection(lambda: gate, lambda: on_gpu)
    values = parse(generate_latest(metrics.registry).decode())
    names = {
        "points": "hogwild_worker_protection_points_total",
        "holds": "hogwild_worker_protection_holds_total",
        "held_seconds": "hogwild_worker_protection_held_seconds_total",
        "gpu": "hogwild_worker_protection_gpu_wait",
        "max_wait": 'hogwild_worker_protection_released_total{reason="max_wait"}',
        "released_share": 'hogwild_worker_protection_released_total{reason="share"}',
        "share": "hogwild_worker_training_share",
        "floor": "hogwild_worker_training_share_floor",
    }
    assert {key: values[names[key]] for key in expected} == expected


def test_each_worker_has_its_own_registry() -> None:
    first, second = WorkerMetrics(), WorkerMetrics(CollectorRegistry())
    first.observe_step(stats(False))
    assert parse(generate_latest(second.registry).decode())["hogwild_worker_steps_total"] == 0


# ---- the unsaved marker in process: the paths a worker process cannot be made to take on demand -------------
@pytest.fixture
def service(tmp_path: Path) -> Iterator[WorkerService]:
    """A real WorkerService and its metrics, "mapped" to an exporter nonce without weights: only the marker
    bookkeeping runs (no step, no checkpoint write)."""
    settings = WorkerSettings(run_dir=tmp_path / "run", checkpoint_dir=tmp_path / "checkpoints")
    settings.run_dir.mkdir()
    worker = WorkerService(settings, TrainingConfig(), WorkerMetrics())
    worker.watcher.mapped = cast(
        Any, SimpleNamespace(manifest=SimpleNamespace(exporter=SimpleNamespace(nonce="n1")))
    )
    yield worker
    worker.watcher.mapped = None
    worker.shutdown()


def unsaved_since(worker: WorkerService) -> float:
    return parse(generate_latest(worker.metrics.registry).decode())[UNSAVED]


def test_a_skipped_step_leaves_nothing_unsaved(service: WorkerService) -> None:
    """Skipped (loss or gradient not finite): the weights and optimizer state are bit for bit what they were."""
    service._on_step(stats(skipped=True))
    assert unsaved_since(service) == 0
    before = time.time()
    service._on_step(stats(skipped=False))
    assert before <= unsaved_since(service) <= time.time()


def test_a_checkpoint_between_a_step_and_its_callback_holds_that_step(service: WorkerService) -> None:
    """A checkpoint waiting for the trainer's lock runs as soon as a step lets go of it, before that step's
    on_step callback: the callback must not mark the step the checkpoint already holds as unsaved."""
    mapped = service.mapped
    assert mapped is not None
    service._on_step(stats(skipped=False, step=1))
    service.trainer.counters.step = 1
    service.unsaved.saved_now(mapped, 1)  # what checkpoint() does under the lock, after writing step 1
    service._on_step(stats(skipped=False, step=1))  # step 1's late callback
    late = unsaved_since(service)
    service._on_step(stats(skipped=False, step=2))
    assert (late, unsaved_since(service) > 0) == (0, True)
