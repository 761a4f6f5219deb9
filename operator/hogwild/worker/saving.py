"""Checkpoints of one worker: write one (a request, the interval, shutdown), restore one, and remember the last.

The format and the crash-safe write live in hogwild.checkpoint; what a checkpoint holds (weights, optimizer
state, counters, config, version) in hogwild.worker.persistence. This module is the worker's side: it takes
the trainer's lock while the weights are copied out or in, keeps the "unsaved since" marker true, prunes old
checkpoints, and feeds the metrics. hogwild.worker.service decides when (jobs, the interval, the replica group).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from hogwild import checkpoint
from hogwild.protocol import CheckpointReply, ProtocolError, RestoreReply, RestoreRequest
from hogwild.worker import persistence
from hogwild.worker.metrics import WorkerMetrics
from hogwild.worker.model import MappedModel
from hogwild.worker.safety import Safety
from hogwild.worker.trainer import Trainer

log = logging.getLogger("hogwild.worker")


class Checkpoints:
    def __init__(
        self,
        checkpoint_dir: Path,
        *,
        trainer: Trainer,
        mapped: Callable[[], MappedModel | None],
        safety: Safety,
        unsaved: persistence.UnsavedTracker,
        metrics: WorkerMetrics,
    ) -> None:
        self.dir = checkpoint_dir
        self.trainer, self._mapped, self.safety = trainer, mapped, safety
        self.unsaved, self.metrics = unsaved, metrics
        # A crash mid-write leaves a temporary directory, never a half checkpoint: clear those away first.
        removed = checkpoint.sweep_temporary(checkpoint_dir)
        if removed:
            log.info(
                "removed incomplete checkpoints",
                extra={"event": "checkpoint_swept", "paths": [str(p) for p in removed]},
            )
        self.last = checkpoint.newest_complete(checkpoint_dir)
        self.last_mono = time.monotonic()  # the interval counts from the start, or from the last write
        if self.last is not None:
            metrics.set_last_checkpoint(self.last.time)

    def _require_mapped(self, what: str) -> MappedModel:
        mapped = self._mapped()
        if mapped is None:
            raise ProtocolError("not_connected", f"the served weights are not mapped; nothing to {what}")
        return mapped

    def save(self, reason: str) -> CheckpointReply:
        with self.trainer.exclusive():  # no step runs while the weights are copied out
            mapped = self._require_mapped("checkpoint")
            written = persistence.save(self.dir, self.trainer, mapped, reason, self.safety.version)
            self.unsaved.saved_now(mapped, self.trainer.counters.step)
        removed = checkpoint.prune(self.dir, self.trainer.config.checkpoint_keep)
        self.last = written.checkpoint
        self.last_mono = time.monotonic()
        self.metrics.observe_checkpoint(
            reason=reason,
            seconds=written.seconds,
            size_bytes=written.bytes,
            timestamp=written.checkpoint.time,
        )
        reply: CheckpointReply = {
            "step": written.checkpoint.step,
            "path": str(written.checkpoint.path),
            "bytes": written.bytes,
            "seconds": written.seconds,
            "reason": reason,
            "pruned": [str(p) for p in removed],
            "version": written.checkpoint.meta.get("weights_version"),
        }
        log.info("checkpoint written", extra={"event": "checkpoint", **reply})
        return reply

    def peer_saved(self, step: int) -> None:
        """Another replica wrote a checkpoint of `step`: if these weights are at that step, they are saved too."""
        mapped = self._mapped()
        if mapped is None:
            return
        with self.trainer.lock:
            if self.trainer.counters.step == step:
                self.unsaved.saved_now(mapped, step)

    def peer_reset(self, saved: bool) -> None:
        """Another replica restored or rolled back and these weights are now its: saved if they are there."""
        mapped = self._mapped()
        if mapped is None:
            return
        self.safety.snapshots.went_back_to(
            None
        )  # this replica's snapshots precede weights it no longer holds
        if saved:
            self.unsaved.saved_now(mapped, self.trainer.counters.step)
        else:
            self.unsaved.unsaved_at(mapped, time.time())

    def restore(self, request: RestoreRequest) -> RestoreReply:
        found = checkpoint.find(self.dir, request.step)
        if found is None:
            which = (
                "no complete checkpoint"
                if request.step is None
                else f"no complete checkpoint of step {request.step}"
            )
            raise ProtocolError("not_found", f"{which} in {self.dir}")
        with self.trainer.exclusive():
            mapped = self._require_mapped("restore into")
            try:
                loaded = persistence.load(
                    found, self.trainer, mapped, weights=request.weights, optimizer=request.optimizer
                )
            except checkpoint.CheckpointError as err:
                raise ProtocolError("invalid", str(err)) from None
            newest = checkpoint.newest_complete(self.dir)
            if newest is None or newest.path != found.path or not request.weights:
                # Rolled back to an older checkpoint: persist the rollback with the next checkpoint. Unsaved
                # since now, or since earlier if steps were already unsaved (the earlier time is kept).
                self.unsaved.unsaved_at(mapped, time.time())
            else:
                self.unsaved.saved_now(mapped, self.trainer.counters.step)
            if request.weights:
                self.safety.snapshots.went_back_to(None)
                self.safety.new_lineage(
                    f"restore of {found.path.name}", found.meta.get("weights_version"), "restore"
                )
        reply: RestoreReply = {
            "version": self.safety.version,
            "step": self.trainer.counters.step,
            "path": str(found.path),
            "weights": request.weights,
            "optimizer": loaded,
        }
        log.info("restored", extra={"event": "restored", **reply})
        return reply
