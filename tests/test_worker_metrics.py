"""The worker's Prometheus metrics move with what it does, scraped over HTTP like Prometheus would.

Real: a worker process training a stand-in exporter's weights, its /metrics endpoint (prometheus-client's
HTTP server), and prometheus-client's own text parser; plus a WorkerMetrics object fed step results directly
for the skipped-step path, which a process cannot be made to hit on demand.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hogwild.protocol import ProtocolError
from hogwild.testing.exporter import ExporterProcess
from hogwild.testing.worker_process import WorkerProcess
from hogwild.worker.metrics import WorkerMetrics
from hogwild.worker.trainer import StepStats
from worker_helpers import FACT, Pod, exporter_process, pod_of


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExporterProcess]:
    yield from exporter_process(tmp_path_factory)


@pytest.fixture
def pod(exporter: ExporterProcess, tmp_path: Path) -> Iterator[Pod]:
    yield from pod_of(exporter, tmp_path)


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


def test_checkpoint_interval_and_unsaved_training_follow_the_worker(pod: Pod) -> None:
    """What HogwildCheckpointTooOld compares: the configured interval, hot changes included, and whether the
    served weights hold steps that no checkpoint has."""
    worker = pod.worker(config={"checkpoint_interval_s": 600})
    worker.wait_connected()
    seen = {"connected": scrape(worker)}
    worker.call("train", samples=[FACT], steps=1)
    seen["trained"] = scrape(worker)
    worker.call("checkpoint")
    worker.call("configure", changes={"checkpoint_interval_s": 3600})
    seen["checkpointed, then reconfigured"] = scrape(worker)

    assert {
        when: (s["hogwild_worker_checkpoint_interval_seconds"], s["hogwild_worker_trained_since_checkpoint"])
        for when, s in seen.items()
    } == {
        "connected": (600, 0),
        "trained": (600, 1),
        "checkpointed, then reconfigured": (3600, 0),
    }


def stats(skipped: bool) -> StepStats:
    return StepStats(
        step=1,
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


def test_each_worker_has_its_own_registry() -> None:
    first, second = WorkerMetrics(), WorkerMetrics(CollectorRegistry())
    first.observe_step(stats(False))
    assert parse(generate_latest(second.registry).decode())["hogwild_worker_steps_total"] == 0
