"""Safe online learning in the worker: weight versions, kept versions, rollback and the evaluation gate.

- The version (`<lineage>.<step>`, hogwild.versions) is published after every change of the served weights
  to `<run dir>/weights-version`, which vLLM's side reads into every OpenAI response
  (hogwild.vllm_plugin.versions). A new lineage starts when the weights are (re)mapped, restored, rolled back
  or reverted.
- Before each /train request, the state is copied to host memory (hogwild.worker.snapshots) when snapshots
  are kept or the gate is on; `rollback` goes back to a snapshot or to a checkpoint on the volume.
- The gate evaluates the held-out loss before and after the request and, when the policy is broken, puts the
  snapshot back at once. The rejected update is served from its first step until the revert ends (HOGWILD:
  updates are live); the reply's `visible_s` says how long that was.

Every method that touches weights takes the trainer's `exclusive()` itself; the service calls them from its
job threads.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from hogwild import checkpoint, versions
from hogwild.config import EvalGate
from hogwild.protocol import (
    GatedTrainReply,
    ProtocolError,
    Restored,
    RollbackReply,
    SafetyStatus,
    Sample,
    TrainSteps,
)
from hogwild.versions import Kept, Lineage, Target, TargetError, Verdict
from hogwild.worker import evaluation, persistence, snapshots
from hogwild.worker.evaluation import EvalSet
from hogwild.worker.metrics import WorkerMetrics
from hogwild.worker.model import MappedModel
from hogwild.worker.trainer import Trainer

log = logging.getLogger("hogwild.worker")


class Consensus(Protocol):
    """A replica group's agreement inside one shared /train request (hogwild.worker.group.runner): every member
    calls each method at the same point of the request and gets rank 0's answer."""

    def loss(self, mine: float | None, error: ProtocolError | None) -> float | None:
        """Rank 0's held-out loss (None: its gate is off); raises rank 0's error on every member."""

    def lineage(self, mine: Lineage) -> Lineage: ...


def write_version(run_dir: Path, version: str) -> None:
    target = run_dir / versions.VERSION_FILE
    tmp = target.with_name(f".tmp-{versions.VERSION_FILE}")
    tmp.write_text(version)
    os.replace(tmp, target)


class Safety:
    def __init__(
        self,
        *,
        run_dir: Path,
        checkpoint_dir: Path,
        trainer: Trainer,
        mapped: Callable[[], MappedModel | None],
        metrics: WorkerMetrics,
    ) -> None:
        self.run_dir, self.checkpoint_dir = run_dir, checkpoint_dir
        self.trainer, self._mapped, self.metrics = trainer, mapped, metrics
        self.lineage = Lineage(versions.new_lineage(), "start (weights not mapped yet)")
        self.snapshots = snapshots.Snapshots()
        self.eval_set: EvalSet | None = evaluation.load_saved(run_dir)
        self._loss_cache: tuple[str, int, float] | None = None  # (version, id of the eval set, loss)
        self.evaluations = {versions.ACCEPTED: 0, versions.REVERTED: 0}
        self.rollbacks = 0
        self.last_verdict: dict[str, Any] | None = None
        self.last_rollback: dict[str, Any] | None = None
        self._published = ""
        self._last_request: tuple[str, RollbackReply] | None = None  # (rollback request_id, its reply)
        self._checkpoints: tuple[tuple[int, int], list[Kept]] | None = None  # ((mtime, links), what it held)
        # (version, snapshot): the current weights are that kept snapshot's unchanged copy (right after a
        # rollback or revert to it), so it is not copied again.
        self._copy_of_kept: tuple[str, snapshots.Snapshot] | None = None

    # ---- the version -------------------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return str(versions.Version(self.lineage.id, self.trainer.counters.step))

    def publish(self) -> None:
        version = self.version
        if version != self._published:
            write_version(self.run_dir, version)
            self._published = version
            self.metrics.weights_step.set(self.trainer.counters.step)

    def new_lineage(self, origin: str, parent: str | None, reason: str) -> None:
        self.lineage = Lineage(versions.new_lineage(), origin, parent)
        self.metrics.lineages.labels(reason=reason).inc()
        self.publish()
        log.info("new lineage", extra={"event": "lineage", "version": self.version, "origin": origin})

    def adopt_lineage(self, lineage: Lineage) -> None:
        """Another replica's lineage (a replica group formed): the same weights carry the same version on all."""
        if lineage != self.lineage:
            self.lineage = lineage
            self.publish()

    def mapped_now(self, restored: str | None) -> None:
        """The weights were (re)mapped: what vLLM serves descends from a checkpoint, or from the start."""
        origin = f"checkpoint {Path(restored).name}" if restored else "start (no checkpoint of these weights)"
        self.snapshots = snapshots.Snapshots()  # snapshots of other weights (another vLLM) do not fit these
        self.new_lineage(origin, None, "mapped")

    # ---- kept versions and rollback -------------------------------------------------------------------------
    def _mapped_or_fail(self) -> MappedModel:
        mapped = self._mapped()
        if mapped is None:
            raise ProtocolError("not_connected", "the served weights are not mapped yet")
        return mapped

    def _take(self, mapped: MappedModel) -> snapshots.Snapshot:
        s = self.snapshots
        if self._copy_of_kept and self._copy_of_kept[0] == self.version and s.get(self._copy_of_kept[1].seq):
            s.head = self._copy_of_kept[1].seq
            return self._copy_of_kept[1]
        snap = snapshots.take(self.trainer, mapped, seq=s.next_seq(), version=self.version, parent=s.head)
        s.add(snap, self.trainer.config.snapshots)
        self.metrics.snapshot_seconds.set(snap.seconds)
        self.metrics.snapshot_bytes.set(s.bytes)
        return snap

    def kept_checkpoints(self) -> list[Kept]:
        """The checkpoints on the volume, read again only when the directory changed (status asks every second
        during a train request: the heartbeat)."""
        try:
            found = os.stat(self.checkpoint_dir)
            stamp = (found.st_mtime_ns, found.st_nlink)
        except OSError:
            return []
        if self._checkpoints is None or self._checkpoints[0] != stamp:
            kept = [
                Kept("checkpoint", str(c.path), c.meta.get("weights_version"), c.step)
                for c in checkpoint.list_complete(self.checkpoint_dir)
            ]
            self._checkpoints = (stamp, kept)
        return list(self._checkpoints[1])

    def rollback(
        self, target: Target, *, reason: str = "rollback", request_id: str | None = None
    ) -> RollbackReply:
        if request_id is not None and self._last_request and self._last_request[0] == request_id:
            return {**self._last_request[1], "repeated": True}  # idempotent: applied already, not again
        started = time.monotonic()
        with self.trainer.exclusive():
            mapped = self._mapped_or_fail()
            before = self.version
            try:
                kept = versions.pick_target(
                    target,
                    current=before,
                    previous_snapshot=(p.kept() if (p := self.snapshots.get(self.snapshots.head)) else None),
                    snapshots=self.snapshots.kept(),
                    checkpoints=self.kept_checkpoints(),
                )
            except TargetError as err:
                raise ProtocolError("not_found", str(err)) from None
            snap = self.snapshots.get(int(kept.key)) if kept.kind == "snapshot" else None
            # The state being left is kept too (when snapshots are), so that a rollback can be undone; not
            # when it is a kept snapshot's unchanged copy (right after a rollback to it).
            if self.trainer.config.snapshots > 0:
                self._take(mapped)
            if snap is not None:
                optimizer = snapshots.restore(snap, self.trainer, mapped)
                self.snapshots.went_back_to(snap)
            else:
                found = checkpoint.Checkpoint(Path(kept.key), kept.step, 0.0, {})
                try:
                    optimizer = persistence.load(found, self.trainer, mapped, weights=True, optimizer=True)
                except checkpoint.CheckpointError as err:
                    raise ProtocolError("invalid", str(err)) from None
                self.snapshots.went_back_to(None)
            label = kept.version or f"checkpoint step {kept.step}"
            self.new_lineage(f"{reason} to {label}", kept.version, reason)
            self._copy_of_kept = (self.version, snap) if snap is not None else None
        seconds = round(time.monotonic() - started, 4)
        self.rollbacks += reason == "rollback"
        self.metrics.rollbacks.labels(kind=kept.kind, reason=reason).inc()
        self.metrics.rollback_seconds.set(seconds)
        restored: Restored = {"kind": kept.kind, "version": kept.version, "step": kept.step}
        if kept.kind == "checkpoint":
            restored["path"] = kept.key
        reply: RollbackReply = {
            "restored": restored,
            "from_version": before,
            "version": self.version,
            "optimizer": optimizer,
            "seconds": seconds,
        }
        if reason == "rollback":
            self.last_rollback = {"to": str(target), **reply, "time": time.time(), "request_id": request_id}
        if request_id is not None:
            self._last_request = (request_id, reply)
        log.info(reason, extra={"event": reason, **{k: v for k, v in reply.items() if k != "restored"}})
        return reply

    # ---- the evaluation gate -----------------------------------------------------------------------------
    def set_eval_samples(self, samples: tuple[Sample, ...]) -> None:
        self._set_eval(EvalSet(samples, "api"))

    def load_eval_file(self, gate: EvalGate) -> None:
        if gate.eval_file:
            self._set_eval(evaluation.read_file(gate.eval_file))

    def _set_eval(self, eval_set: EvalSet) -> None:
        """Check that the set gives a finite loss on the current weights, then use it (else change nothing)."""
        if self.trainer.attached:
            loss = self._loss(eval_set)
            if not math.isfinite(loss):
                raise ProtocolError(
                    "invalid",
                    "the evaluation set's loss on the current weights is not finite (NaN); set not changed",
                )
        self.eval_set = eval_set
        self._loss_cache = None
        evaluation.save(self.run_dir, eval_set)

    def check_policy(self, gate: EvalGate) -> None:
        if gate.enabled and self.eval_set is None and not gate.eval_file:
            raise ProtocolError(
                "invalid",
                "the evaluation gate needs an evaluation set: send eval_samples or set gate.eval_file",
            )

    def _loss(self, eval_set: EvalSet) -> float:
        t = self.trainer
        with t.exclusive():
            if self._loss_cache and self._loss_cache[:2] == (self.version, id(eval_set)):
                return self._loss_cache[2]
            loss = evaluation.held_out_loss(
                t.module,
                t.tokenizer,
                t.vocab_size,
                eval_set.samples,
                max_tokens=max(t.config.max_tokens_per_step, 1),
                parts=t.config.grad_accumulation,
            )
            self._loss_cache = (self.version, id(eval_set), loss)
        self.metrics.eval_loss.set(loss)
        return loss

    def before_update(
        self, consensus: Consensus | None = None
    ) -> tuple[snapshots.Snapshot | None, float | None]:
        """Before a /train request: the snapshot to revert to and the held-out loss now (when gated)."""
        gate = self.trainer.config.gate
        with self.trainer.exclusive():
            mapped = self._mapped_or_fail()
            mine: float | None = None
            error: ProtocolError | None = None
            if gate.enabled:
                try:
                    if self.eval_set is None:
                        self.check_policy(gate)
                        self.load_eval_file(gate)  # a file named before the weights were mapped
                    mine = self._loss(self.eval_set) if self.eval_set is not None else None
                except ProtocolError as err:
                    error = err
            if consensus is not None:  # every member judges with rank 0's loss (and fails with its error)
                before = consensus.loss(mine, error)
            elif error is not None:
                raise error
            else:
                before = mine
            snap = self._take(mapped) if before is not None or self.trainer.config.snapshots > 0 else None
            if before is not None and not math.isfinite(before):
                raise ProtocolError(
                    "invalid", "the held-out loss is not finite before the update; not trained"
                )
            return snap, before

    def after_update(
        self,
        snap: snapshots.Snapshot | None,
        before: float | None,
        first_step_at: float | None,
        consensus: Consensus | None = None,
    ) -> Verdict | None:
        """After a gated request that changed the weights: judge it, and revert at once if it broke the policy."""
        if snap is None or before is None or snap.version == self.version:
            return None
        gate = self.trainer.config.gate
        with self.trainer.exclusive():
            rejected = self.version
            after: float | None = self._loss(self.eval_set) if self.eval_set is not None else math.nan
            if consensus is not None:
                after = consensus.loss(after, None)
            verdict = versions.judge(
                before,
                math.nan if after is None else after,
                max_rise=gate.max_loss_rise,
                max_rise_ratio=gate.max_loss_rise_ratio,
            )
            self.evaluations[verdict.verdict] += 1
            self.metrics.evaluations.labels(verdict=verdict.verdict).inc()
            if verdict.verdict == versions.REVERTED:
                self.revert(snap, rejected, consensus)
        record = {**verdict.as_dict(), "version": self.version, "time": time.time()}
        if verdict.verdict == versions.REVERTED:
            record["rejected_version"] = rejected
            record["visible_s"] = round(time.monotonic() - (first_step_at or time.monotonic()), 4)
            log.warning("update reverted", extra={"event": "reverted", **record})
        self.last_verdict = record
        return verdict

    def gated(self, train: Callable[[], TrainSteps], consensus: Consensus | None = None) -> GatedTrainReply:
        """Run one /train request's steps (`train` returns its reply) under the snapshot and the gate.

        `consensus`: the replica group's, when every member runs this request (each judges with the same losses
        and reverts its own copy of the same snapshot); None on a lone worker."""
        snap, loss_before = self.before_update(consensus)
        first_step_at = time.monotonic()
        try:
            steps = train()
        except ProtocolError as err:
            if loss_before is not None and snap is not None and snap.version != self.version:
                with self.trainer.exclusive():  # a gated update that did not finish is not kept
                    self.revert(snap, self.version, consensus)
                err.message += f"; the gate reverted its steps (weights at {self.version})"
            raise
        self.publish()  # the service publishes after every step too; this covers a request of skipped steps
        verdict = self.after_update(snap, loss_before, first_step_at, consensus)
        return {
            **steps,
            "step": self.trainer.counters.step,
            "version": self.version,
            "gate": self.last_verdict if verdict is not None else None,
        }

    def revert(self, snap: snapshots.Snapshot, rejected: str, consensus: Consensus | None = None) -> None:
        mapped = self._mapped_or_fail()
        snapshots.restore(snap, self.trainer, mapped)
        self.snapshots.went_back_to(snap)
        self.metrics.reverts.inc()
        self.new_lineage(f"revert of {rejected} to {snap.version}", snap.version, "revert")
        if consensus is not None:  # each member started its own lineage: all take rank 0's
            self.adopt_lineage(consensus.lineage(self.lineage))
        self._copy_of_kept = (self.version, snap)

    # ---- status --------------------------------------------------------------------------------------------
    def status(self) -> SafetyStatus:
        gate = self.trainer.config.gate
        return {
            "version": self.version,
            "lineage": self.lineage.as_dict(),
            "snapshots": self.snapshots.summaries(),
            "snapshot_bytes": self.snapshots.bytes,
            "kept_checkpoints": [
                {"version": k.version, "step": k.step} for k in self.kept_checkpoints() if k.version
            ],
            "gate": {
                "enabled": gate.enabled,
                "eval_set": self.eval_set.summary() if self.eval_set else None,
                "evaluations": sum(self.evaluations.values()),
                "reverts": self.evaluations[versions.REVERTED],
                "last": self.last_verdict,
            },
            "rollbacks": self.rollbacks,
            "last_rollback": self.last_rollback,
        }
