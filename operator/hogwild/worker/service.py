"""The worker's state behind its protocol messages (status, configure, train, checkpoint, restore, rollback,
join): jobs, checkpoints and the interval.

The socket loop (hogwild.worker.server) calls `handle` and `tick` from one thread. Quick requests (status,
configure, join) answer at once; train runs on its own thread and checkpoint/restore on another, so status
keeps answering while they run (hogwild.worker.jobs: one train at a time, a second gets `busy`, and one
checkpoint or restore at a time). In a replica group, train, configure, restore and rollback go through the
group's thread instead (hogwild.worker.group.runner). Each job replies through `done` when it finishes.

What "unsaved since" means (the marker behind trained_since_checkpoint, the SIGTERM checkpoint and the
hogwild_worker_unsaved_since_timestamp_seconds gauge), and what a checkpoint holds: hogwild.worker.persistence;
writing and restoring one: hogwild.worker.saving. Mapping the served weights (and following vLLM's restarts):
hogwild.worker.watcher.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hogwild.config import ConfigError, TrainingConfig
from hogwild.protocol import (
    CheckpointReply,
    CheckpointRequest,
    ConfigureReply,
    ConfigureRequest,
    Endpoints,
    GatedTrainReply,
    JoinReply,
    JoinRequest,
    ProtocolError,
    Reply,
    Request,
    RestoreReply,
    RestoreRequest,
    RollbackReply,
    RollbackRequest,
    StatusReply,
    StatusRequest,
    TrainRequest,
    new_id,
)
from hogwild.worker import gpu_power, jobs, persistence, protection, status
from hogwild.worker.group.runner import ReplicaGroup
from hogwild.worker.group.settings import GroupSettings, settings_to_join
from hogwild.worker.metrics import WorkerMetrics
from hogwild.worker.model import MappedModel, prewarm_imports
from hogwild.worker.safety import Consensus, Safety
from hogwild.worker.saving import Checkpoints
from hogwild.worker.trainer import StepStats, Trainer
from hogwild.worker.watcher import Watcher

log = logging.getLogger("hogwild.worker")
TRAINED_LOG_FIELDS = ("step", "loss", "tokens", "skipped", "steps")
Done = Callable[[Reply | ProtocolError], None]


@dataclass(frozen=True)
class WorkerSettings:
    run_dir: Path
    checkpoint_dir: Path
    device: str | None = None
    vllm_metrics_url: str | None = None  # serving load, when vLLM's side writes no load hint
    group: GroupSettings | None = None  # the replica group this worker trains with; None: alone


class WorkerService:
    def __init__(self, settings: WorkerSettings, config: TrainingConfig, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.trainer = Trainer(config, on_step=self._on_step)
        # Serving protection: preemption points in every step, which wait while vLLM has requests in flight.
        self.gate = protection.serving_gate(settings.run_dir, config.protection, settings.vllm_metrics_url)
        metrics.watch_protection(lambda: self.gate.stats, lambda: self.gate.device is not None)
        # The same points inside the pieces no module hook cuts: head and loss, clip, optimizer step.
        self.trainer.preemption_point = self.gate.point
        self.watcher = Watcher(
            run_dir=settings.run_dir,
            checkpoint_dir=settings.checkpoint_dir,
            device=settings.device,
            trainer=self.trainer,
            preemption_point=self.gate.point,
            protecting=lambda: self.gate.settings.yield_when_busy,
            metrics=metrics,
        )
        # NVML once the weights are mapped: finding the GPU initializes CUDA (see gpu_power.OnDemand).
        metrics.watch_gpu(gpu_power.OnDemand(settings.device, lambda: self.watcher.mapped is not None).read)
        # Versions, kept versions, rollback and the evaluation gate (hogwild.worker.safety).
        self.safety = Safety(
            run_dir=settings.run_dir,
            checkpoint_dir=settings.checkpoint_dir,
            trainer=self.trainer,
            mapped=lambda: self.watcher.mapped,
            metrics=metrics,
        )
        self.unsaved = persistence.UnsavedTracker(settings.run_dir, lambda: self.watcher.mapped)
        self.checkpoints = Checkpoints(
            settings.checkpoint_dir,
            trainer=self.trainer,
            mapped=lambda: self.watcher.mapped,
            safety=self.safety,
            unsaved=self.unsaved,
            metrics=metrics,
        )
        self._versioned: MappedModel | None = None  # the mapping the current lineage started with
        # Replicas: train and configure requests go to the group, which runs them on every member in order.
        self.group = None if settings.group is None else self._replica_group(settings.group)
        self._rolling_back = False
        self.endpoints: Endpoints = {}
        # Which process answers: a client that sees it change knows its in-flight request died with the last.
        self.incarnation = new_id()
        self.training = jobs.Slot(
            "a train request is already running; one runs at a time",
            lambda running: metrics.busy.set(1 if running else 0),
        )
        self.maintenance = jobs.Slot("a checkpoint or restore is already running")
        self._stopping = threading.Event()
        metrics.observe_config(config)
        metrics.unsaved_since_timestamp_seconds.set_function(lambda: self.unsaved_since or 0.0)
        # Model code imports take seconds: do them now, while vLLM loads, not after it exports its weights.
        threading.Thread(target=prewarm_imports, name="prewarm-imports", daemon=True).start()
        if self.group is not None:
            self.group.start()

    # ---- dispatch ---------------------------------------------------------------------------------------
    def handle(self, request: Request, done: Done) -> None:
        self.metrics.requests.labels(type=request.type).inc()
        if isinstance(request, StatusRequest):
            done(self.status())
        elif isinstance(request, ConfigureRequest):
            # In a group every member applies it at the same exchange (an evaluation set too); while no group
            # is formed it applies here at once.
            if self.group is not None and self.group.submit_configure(request, done):
                return
            if request.eval_samples is not None or "gate" in request.changes:
                # A new evaluation set is evaluated first (after a running step): off the socket thread, so
                # status keeps answering the heartbeat meanwhile.
                jobs.on_thread("configure", lambda: self.configure(request), done)
            else:
                done(self.configure(request))
        elif isinstance(request, TrainRequest):
            self._start_train(request, done)
        elif isinstance(request, CheckpointRequest):
            self._start_maintenance("checkpoint", lambda: self.checkpoint(request.reason), done)
        elif isinstance(request, RestoreRequest):
            self._start_weights_change("restore", lambda: self.restore(request), done)
        elif isinstance(request, RollbackRequest):
            self._start_weights_change("rollback", lambda: self.rollback(request), done)
        elif isinstance(request, JoinRequest):
            done(self.join(request))
        else:  # decode_request only returns the types above
            raise ProtocolError("unknown_type", f"no handler for {request.type}")

    def _replica_group(self, settings: GroupSettings) -> ReplicaGroup:
        return ReplicaGroup(
            settings,
            trainer=self.trainer,
            metrics=self.metrics,
            lineage=lambda: self.safety.lineage,
            adopt_lineage=self.safety.adopt_lineage,
            run_train=self._train_gated,
            apply_configure=self.configure,
            mapping=lambda: self.watcher.mapped,
            peer_saved=self.checkpoints.peer_saved,
            peer_reset=self.checkpoints.peer_reset,
        )

    def join(self, request: JoinRequest) -> JoinReply:
        """Join the session's replica group now, as if started with the group's environment (the operator
        sends this to a running pod built for one replica when the session scales up)."""
        wanted = settings_to_join(request.replica, request.rendezvous, request.host_store)
        if self.group is not None:
            have = self.group.settings  # the same environment gives the same tunables: compare all
            if have != wanted:
                raise ProtocolError(
                    "invalid",
                    f"this worker is replica {have.replica} of the group at {have.rendezvous} already",
                )
            return {"joined": False, "group": self.group.status()}
        # A lone request or checkpoint runs without the group's collectives: join between them, not during.
        if self.training.running or self.writing:
            raise ProtocolError("busy", "a train request or checkpoint is running; join after it finishes")
        self.group = self._replica_group(wanted)
        self.group.start()
        log.info(
            "joining a replica group",
            extra={"event": "group_join", "replica": wanted.replica, "rendezvous": wanted.rendezvous},
        )
        return {"joined": True, "group": self.group.status()}

    @property
    def mapped(self) -> MappedModel | None:
        return self.watcher.mapped

    @property
    def busy(self) -> bool:
        return self.training.running or (self.group is not None and self.group.running)

    @property
    def writing(self) -> bool:
        return self.maintenance.running

    def _start_train(self, request: TrainRequest, done: Done) -> None:
        if self._stopping.is_set():
            raise ProtocolError("not_connected", "the worker is shutting down")
        if not self.trainer.attached:
            raise ProtocolError("not_connected", "the served weights are not mapped yet")
        if self.trainer.config.paused:
            raise ProtocolError("busy", "training is paused (configure paused=false to resume)")
        if self._rolling_back:
            raise ProtocolError("busy", "a rollback is running; train after it finishes")

        def counted(result: Reply | ProtocolError) -> None:
            code = result.code if isinstance(result, ProtocolError) else "ok"
            self.metrics.train_requests.labels(result=code).inc()
            done(result)

        def start(finished: Done) -> threading.Thread | None:
            if self.group is None:
                return jobs.on_thread("train", lambda: self.train(request), finished)
            self.group.submit_train(request, finished)  # raises (busy, forming) before it runs
            return None

        # This replica's own request holds the slot; one that came through another replica only makes it wait.
        self.training.start(start, counted)

    def _start_maintenance(self, name: str, job: Callable[[], Reply], done: Done) -> None:
        """Checkpoint, restore and rollback take turns; each runs under its own name, which its errors carry.
        In a replica group a restore or rollback runs on the group's thread at an exchange, after which every
        other member takes these weights."""

        def start(finished: Done) -> threading.Thread | None:
            if self.group is None or name == "checkpoint":
                return jobs.on_thread(name, job, finished)
            run = lambda: (jobs.attempt(name, job), not self.trained_since_checkpoint)  # noqa: E731
            self.group.submit_reset(name, run, finished)  # raises (forming, busy) before it runs
            return None

        self.maintenance.start(start, done)

    def _start_weights_change(self, name: str, job: Callable[[], Reply], done: Done) -> None:
        """Restore and rollback: after a running train request, never during it."""
        # In a group, as with train, only this replica's own request refuses it: one that came through another
        # replica ends before the group's next idle exchange, where this one runs.
        if self.training.running if self.group is not None else self.busy:
            verb = "roll back" if name == "rollback" else name
            raise ProtocolError("busy", f"a train request is running; {verb} after it finishes")
        self._start_maintenance(name, job, done)

    # ---- requests ----------------------------------------------------------------------------------------
    def status(self) -> StatusReply:
        t, c, mapped = self.trainer, self.trainer.counters, self.mapped
        return status.status_reply(
            status.StatusInputs(
                connected=t.attached,
                busy=self.busy,
                writing=self.writing,
                step=c.step,
                tokens_trained=c.tokens_trained,
                loss=c.loss,
                skipped_steps=c.skipped_steps,
                config=t.config,
                last_checkpoint=self.checkpoints.last.summary() if self.checkpoints.last else None,
                manifest=mapped.manifest if mapped else None,
                optimizer=type(t.optimizer).__name__ if t.optimizer is not None else None,
                optimizer_state_bytes=t.optimizer_state_bytes,
                weight_bytes=mapped.weight_bytes if mapped else 0,
                device=str(mapped.device) if mapped else None,
                trained_since_checkpoint=self.trained_since_checkpoint,
                mapping_error=self.watcher.mapping_error,
                endpoints={"incarnation": self.incarnation, **self.endpoints},
                protection=dataclasses.asdict(self.gate.stats),
                safety=self.safety.status(),
                group=self.group.status() if self.group is not None else None,
            )
        )

    def configure(self, request: ConfigureRequest) -> ConfigureReply:
        # The evaluation set and the gate are checked before anything changes: a bad set changes nothing.
        gate = request.changes.get("gate", self.trainer.config.gate)
        if request.eval_samples is not None:
            self.safety.set_eval_samples(request.eval_samples)
        if "gate" in request.changes:
            self.safety.load_eval_file(gate)
        self.safety.check_policy(gate)
        try:
            reply = self.trainer.configure(request.changes)
        except ConfigError as err:
            raise ProtocolError("invalid", str(err)) from None
        self.metrics.observe_config(self.trainer.config)
        self.gate.update(self.trainer.config.protection)
        log.info(
            "configured",
            extra={"event": "configured", "applied": reply["applied"], "state_reset": reply["state_reset"]},
        )
        return reply

    def train(self, request: TrainRequest) -> GatedTrainReply:
        deadline = time.monotonic() + request.timeout_s

        def should_stop() -> str | None:
            if self._stopping.is_set():
                raise ProtocolError(
                    "not_connected",
                    f"the worker is shutting down (weights at step {self.trainer.counters.step})",
                )
            if time.monotonic() > deadline:
                raise ProtocolError(
                    "timeout",
                    f"train did not finish within timeout_s={request.timeout_s:g}; "
                    f"the steps done so far are applied (weights at step {self.trainer.counters.step})",
                )
            return "paused" if self.trainer.config.paused else None

        return self._train_gated(request, should_stop)

    def _train_gated(
        self,
        request: TrainRequest,
        should_stop: Callable[[], str | None],
        consensus: Consensus | None = None,
    ) -> GatedTrainReply:
        """A train request's steps under the snapshot and the gate: alone, or (`consensus`, called on the group's
        thread) as one member of a replica group's shared request."""
        reply = self.safety.gated(
            lambda: self.trainer.train(
                request, should_stop=should_stop, rest=lambda s: self._stopping.wait(s) and None
            ).reply(),
            consensus,
        )
        log.info(
            "trained",
            extra={"event": "trained", **{k: v for k, v in reply.items() if k in TRAINED_LOG_FIELDS}},
        )
        return reply

    def checkpoint(self, reason: str) -> CheckpointReply:
        reply = self.checkpoints.save(reason)
        if self.group is not None:  # the other members hold the same weights: saved there too
            self.group.note_saved(reply["step"])
        return reply

    def restore(self, request: RestoreRequest) -> RestoreReply:
        return self.checkpoints.restore(request)

    def rollback(self, request: RollbackRequest) -> RollbackReply:
        self._rolling_back = True
        try:
            reply = self.safety.rollback(request.to, request_id=request.request_id)
            mapped = self.mapped
            if mapped is not None:  # the rolled-back weights are not the newest checkpoint's (in general)
                self.unsaved.unsaved_at(mapped, time.time())
            return reply
        finally:
            self._rolling_back = False

    # ---- what no checkpoint holds (hogwild.worker.persistence) -------------------------------------------------
    @property
    def unsaved_since(self) -> float | None:
        return self.unsaved.since

    @property
    def trained_since_checkpoint(self) -> bool:
        return self.unsaved.since is not None

    def _on_step(self, stats: StepStats) -> None:
        self.gate.idle()  # until the next step's first point the trainer is neither training nor held
        self.metrics.observe_step(stats)
        if not stats.skipped:
            self.safety.publish()
        self.metrics.optimizer_state_bytes.set(self.trainer.optimizer_state_bytes)
        if stats.skipped:  # the weights and the optimizer state are what they were: nothing new to save
            return
        mapped = self.mapped
        if mapped is None:
            return
        self.unsaved.stepped(mapped, stats.step, time.time())

    # ---- the watcher and the interval checkpoint ---------------------------------------------------------
    def tick(self) -> None:
        """Called by the socket loop between messages: follow the manifest, start interval checkpoints."""
        self.watcher.poll()
        if self.watcher.mapped is not self._versioned:
            self._versioned = self.watcher.mapped
            if self._versioned is not None:
                self.safety.mapped_now(self.watcher.restored_from)
        # In a replica group one member writes the interval checkpoints (rank 0): the others hold the same weights.
        due = (self.group is None or self.group.leader) and status.interval_checkpoint_due(
            interval_s=self.trainer.config.checkpoint_interval_s,
            since_last_s=time.monotonic() - self.checkpoints.last_mono,
            trained_since_checkpoint=self.trained_since_checkpoint,
            connected=self.trainer.attached,
            writing=self.writing,
        )
        if due and not self._stopping.is_set():
            self._start_maintenance("checkpoint", lambda: self.checkpoint("interval"), self._log_result)

    @staticmethod
    def _log_result(result: Reply | ProtocolError) -> None:
        if isinstance(result, ProtocolError):
            log.error("interval checkpoint failed: %s", result.message, extra={"event": "checkpoint_failed"})

    # ---- shutdown ------------------------------------------------------------------------------------------
    def shutdown(self, join_timeout_s: float = 600.0) -> None:
        """Stop training between steps, then write a final checkpoint if anything is unsaved."""
        self._stopping.set()
        if self.group is not None:
            self.group.stop()  # leave first: the others re-form and keep training without this member
        for thread in (self.training.thread, self.maintenance.thread):
            if thread is not None:
                thread.join(join_timeout_s)
        if self.trainer.attached and self.trained_since_checkpoint:
            try:
                self.checkpoint("shutdown")
            except Exception:
                log.exception("final checkpoint failed", extra={"event": "checkpoint_failed"})
        self.gate.close()
