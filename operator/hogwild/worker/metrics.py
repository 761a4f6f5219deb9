"""The worker's Prometheus metrics (`hogwild_worker_*`), served on /metrics (port 9400 in a pod).

Each worker owns a private CollectorRegistry, so several workers (tests) can live in one process. The
checkpoint age is computed at scrape time from the last checkpoint's timestamp.

The configured checkpoint interval (following hot reconfiguration) and since when the served weights hold
unsaved steps are exported too: the alert HogwildCheckpointTooOld fires when training has stayed unsaved
for three of the session's own intervals. `unsaved_since_timestamp_seconds` is the wall time of the first applied
step that no checkpoint has, 0 when a checkpoint holds everything: it comes from the service's marker file
(hogwild.worker.persistence), so it survives a worker restart, stays put through a failed checkpoint and
drops to 0 with a successful one. A skipped step (loss or gradient not finite) changes no weight and sets
nothing.

Serving protection's counts (`protection_*`) are read from the serving gate at scrape time: how often training
was held for serving and for how long, the holds cut short (`max_wait`, `share`), and whether the points wait in
the GPU stream (hogwild.worker.protection.device) or on the host. `training_share` is the share of its own recent time
(~5 s) the trainer kept beside serving (hogwild.worker.protection.share) and `training_share_floor` the configured
`min_training_share` (0 while protection is off): the alert HogwildTrainingShareBelowFloor compares them.

On a CUDA device with NVML, the GPU's SM clock, power draw, power limit and whether the clock is held by the
power limit (`gpu_*`) are read at scrape time too (hogwild.worker.gpu_power): at the limit, training slows
serving through the clock, whatever the protection does. Absent without NVML.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hogwild.config import TrainingConfig
from hogwild.worker.trainer import StepStats

PREFIX = "hogwild_worker_"
STEP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _ProtectionCollector:
    """The serving gate's counts (`protection.GateStats`: points, waits, waited_s, gave_up, share_kept, and the
    training share kept against its floor), read when Prometheus scrapes; zeros (share 1) until a gate is
    attached (`WorkerMetrics.watch_protection`)."""

    def __init__(self) -> None:
        self.stats: Callable[[], Any] = lambda: None
        self.on_gpu: Callable[[], bool] = lambda: False

    def describe(self) -> Iterator[Metric]:
        return self._families(None, False)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.stats(), self.on_gpu())

    @staticmethod
    def _families(stats: Any, on_gpu: bool) -> Iterator[Metric]:
        def count(name: str) -> float:
            return float(getattr(stats, name, 0) or 0)

        yield CounterMetricFamily(
            PREFIX + "protection_points", "Preemption points the trainer passed", value=count("points")
        )
        yield CounterMetricFamily(
            PREFIX + "protection_holds",
            "Times serving was busy at a point and held training",
            value=count("waits"),
        )
        yield CounterMetricFamily(
            PREFIX + "protection_held_seconds",
            "Seconds training was held for serving",
            value=count("waited_s"),
        )
        released = CounterMetricFamily(
            PREFIX + "protection_released",
            "Holds cut short: max_wait_s of busy, or to keep min_training_share",
            labels=["reason"],
        )
        released.add_metric(["max_wait"], count("gave_up"))
        released.add_metric(["share"], count("share_kept"))
        yield released
        yield GaugeMetricFamily(
            PREFIX + "protection_gpu_wait",
            "1 while the preemption points wait in the GPU stream, 0 on the host",
            value=float(on_gpu),
        )
        yield GaugeMetricFamily(
            PREFIX + "training_share",
            "Share of its recent time (~5 s) the trainer kept beside serving: ran / (ran + held)",
            value=float(getattr(stats, "training_share", 1.0)),
        )
        yield GaugeMetricFamily(
            PREFIX + "training_share_floor",
            "Configured min_training_share (0 while serving protection is off)",
            value=float(getattr(stats, "training_share_floor", 0.0)),
        )


class _GpuCollector:
    """`gpu_power.GpuReading` families, read when Prometheus scrapes; none until a reader is attached
    (`WorkerMetrics.watch_gpu`) and none for a scrape whose reading fails, rather than stale values."""

    def __init__(self) -> None:
        self.read: Callable[[], Any] = lambda: None

    def collect(self) -> Iterator[Metric]:
        reading = self.read()
        if reading is None:
            return
        for name, doc, value in (
            ("gpu_sm_clock_hertz", "The GPU's SM clock", reading.sm_clock_hz),
            ("gpu_power_watts", "The GPU's power draw", reading.power_watts),
            ("gpu_power_limit_watts", "The GPU's enforced power limit", reading.power_limit_watts),
            ("gpu_power_capped", "1 while the power limit holds the clock down", float(reading.power_capped)),
            ("gpu_thermal_limited", "1 while heat holds the clock down", float(reading.thermal_limited)),
        ):
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        self.steps = counter("steps", "Optimizer steps applied to the served weights")
        self.tokens = counter("tokens", "Tokens trained on (applied steps)")
        self.skipped_steps = counter(
            "skipped_steps", "Steps skipped because the loss or gradient was not finite"
        )
        self.loss = gauge("loss", "Loss of the last applied step")
        self.grad_norm = gauge("grad_norm", "Gradient norm of the last step, before clipping")
        self.update_norm = gauge("update_norm", "Norm of the last step's change to the weights")
        self.step_seconds = Histogram(
            PREFIX + "step_seconds", "Seconds per training step", buckets=STEP_BUCKETS_S, registry=r
        )
        self.optimizer_state_bytes = gauge("optimizer_state_bytes", "Bytes of optimizer state")
        self.weight_bytes = gauge("weight_bytes", "Bytes of the mapped (served) weights")
        self.checkpoint_seconds = gauge("checkpoint_seconds", "Seconds the last checkpoint took to write")
        self.checkpoint_bytes = gauge("checkpoint_bytes", "Bytes of the last checkpoint")
        self.checkpoints = counter("checkpoints", "Checkpoints written", ("reason",))
        self.last_checkpoint_timestamp = gauge(
            "last_checkpoint_timestamp", "Unix time of the last checkpoint"
        )
        self.checkpoint_age_seconds = gauge("checkpoint_age_seconds", "Seconds since the last checkpoint")
        self._last_checkpoint_time: float | None = None
        self.checkpoint_age_seconds.set_function(self._checkpoint_age_s)
        self.checkpoint_interval_seconds = gauge(
            "checkpoint_interval_seconds",
            "Configured seconds between interval checkpoints (0: interval checkpoints off)",
        )
        # Set by the service with set_function: it reads the marker that survives worker restarts.
        self.unsaved_since_timestamp_seconds = gauge(
            "unsaved_since_timestamp_seconds",
            "Unix time of the first applied step that no checkpoint has (0: a checkpoint holds every step)",
        )
        self.connected = gauge("connected", "1 while the served weights are mapped")
        self.paused = gauge("paused", "1 while training is paused")
        self.busy = gauge("busy", "1 while a train request runs")
        self.errors = counter("errors", "Requests answered with an error, by code", ("code",))
        self.requests = counter("requests", "Requests received, by type", ("type",))
        self.train_requests = counter("train_requests", "Train requests finished, by result", ("result",))
        self.remaps = counter("remaps", "Times the weights were (re)mapped after the exporter changed")
        # Safe online learning (hogwild.worker.safety): versions, kept versions, rollbacks, the gate.
        self.weights_step = gauge("weights_step", "Step of the served weights' version (<lineage>.<step>)")
        self.lineages = counter(
            "lineages", "New weight lineages, by why (mapped, restore, rollback, revert)", ("reason",)
        )
        self.snapshot_bytes = gauge("snapshot_bytes", "Host memory held by kept snapshots")
        self.snapshot_seconds = gauge("snapshot_seconds", "Seconds the last snapshot took to copy")
        self.rollbacks = counter(
            "rollbacks", "Rollbacks and reverts applied, by what they restored", ("kind", "reason")
        )
        self.rollback_seconds = gauge("rollback_seconds", "Seconds the last rollback or revert took")
        self.evaluations = counter("evaluations", "Evaluation-gate verdicts, by verdict", ("verdict",))
        self.reverts = counter("reverts", "Updates reverted by the evaluation gate")
        self.eval_loss = gauge("eval_loss", "Held-out loss of the last evaluation")
        # Replicas (hogwild.worker.group): the group this worker is in, and what keeping it in step costs.
        self.group_size = gauge("group_size", "Members of this replica's training group (0 while it forms)")
        self.group_epoch = gauge("group_epoch", "Epoch of the group's membership (it grows at every re-form)")
        self.group_in_sync = gauge(
            "group_in_sync", "1 when every member's weights digest matched at the last exchange, else 0"
        )
        self.group_regroups = counter(
            "group_regroups", "Times this worker's group re-formed, by why", ("reason",)
        )
        self.group_out_of_sync = counter(
            "group_out_of_sync", "Exchanges where members' weights digests differed (should stay 0)"
        )
        self.group_weight_broadcasts = counter(
            "group_weight_broadcasts",
            "Group formations that sent the weights to members whose digest differed",
        )
        self.allreduce_seconds = Histogram(
            PREFIX + "allreduce_seconds",
            "Seconds per gradient all-reduce over the replica group",
            buckets=STEP_BUCKETS_S,
            registry=r,
        )
        self._protection = _ProtectionCollector()
        r.register(self._protection)
        self._gpu = _GpuCollector()
        r.register(self._gpu)

    def watch_protection(self, stats: Callable[[], Any], on_gpu: Callable[[], bool]) -> None:
        """Export serving protection's counts: `stats()` returns the gate's GateStats at scrape time."""
        self._protection.stats, self._protection.on_gpu = stats, on_gpu

    def watch_gpu(self, read: Callable[[], Any]) -> None:
        """Export the GPU's clock and power: `read()` returns a `gpu_power.GpuReading` (or None) at scrape time."""
        self._gpu.read = read

    def _checkpoint_age_s(self) -> float:
        return time.time() - self._last_checkpoint_time if self._last_checkpoint_time else 0.0

    def observe_config(self, config: TrainingConfig) -> None:
        """The settings dashboards and alerts compare against: at start and after every configure."""
        self.paused.set(int(config.paused))
        self.checkpoint_interval_seconds.set(config.checkpoint_interval_s)

    def observe_step(self, stats: StepStats) -> None:
        self.step_seconds.observe(stats.seconds)
        self.grad_norm.set(stats.grad_norm)
        if stats.skipped:
            self.skipped_steps.inc()
            return
        self.steps.inc()
        self.tokens.inc(stats.tokens)
        self.loss.set(stats.loss)
        self.update_norm.set(stats.update_norm)

    def observe_checkpoint(self, *, reason: str, seconds: float, size_bytes: int, timestamp: float) -> None:
        self.checkpoints.labels(reason=reason).inc()
        self.checkpoint_seconds.set(seconds)
        self.checkpoint_bytes.set(size_bytes)
        self.set_last_checkpoint(timestamp)

    def set_last_checkpoint(self, timestamp: float) -> None:
        self._last_checkpoint_time = timestamp
        self.last_checkpoint_timestamp.set(timestamp)

    def serve(self, port: int, addr: str = "0.0.0.0") -> tuple[int, Any]:
        """Start /metrics on `port` (0: any free port). Returns (bound port, server)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_port), server
