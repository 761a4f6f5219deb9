"""The replica group's thread: the worker service hands it train and configure requests; it runs them with
every other member, in the same order, so that every replica applies the same steps to the same weights.

Lockstep without a leader: at every idle tick (`idle_s`) each member contributes one `plan.Control` to an
allgather (what it wants started, configured, whether it leaves, its step and weights digest) and every
member takes the same `plan.decide` of the same list. A train request runs on all members at once: each
trains its share of every step's samples, the gradients are summed over the group, and every member applies
the same optimizer step (the same state and seeds, hence the same rounding noise). Before each step the
members exchange again: configure changes apply between steps on all of them, and the furthest stop reason
(pause, the origin's timeout, a member leaving or joining) ends the request on all of them.

A member that dies makes the next collective fail on the others (`GroupBroken`): they ask for a new epoch and
form again without it; the request that was running answers an error with the steps already applied (every
survivor holds them). A member that (re)joins receives the weights and optimizer state (`state.synchronize`)
before the group trains again. Serving never waits for any of this: vLLM reads the weights whatever the group
does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from hogwild.errors import ProtocolError
from hogwild.faults import fault_point
from hogwild.protocol import ConfigureReply, ConfigureRequest, Reply, TrainReply, TrainRequest
from hogwild.versions import Lineage
from hogwild.worker.group import plan, rendezvous, state
from hogwild.worker.group.comms import Comms, GroupBroken
from hogwild.worker.group.digest import weights_digest
from hogwild.worker.group.inbox import Done, Inbox, Job, Reset
from hogwild.worker.group.settings import GroupSettings
from hogwild.worker.metrics import WorkerMetrics
from hogwild.worker.safety import Consensus
from hogwild.worker.trainer import Trainer

log = logging.getLogger("hogwild.worker")


class ReplicaGroup:
    def __init__(
        self,
        settings: GroupSettings,
        *,
        trainer: Trainer,
        metrics: WorkerMetrics,
        lineage: Callable[[], Lineage],
        adopt_lineage: Callable[[Lineage], None],
        run_train: Callable[[TrainRequest, Callable[[], str | None], Consensus], TrainReply],
        apply_configure: Callable[[ConfigureRequest], ConfigureReply],
        mapping: Callable[[], object | None],
        peer_saved: Callable[[int], None],
        peer_reset: Callable[[bool], None],
    ) -> None:
        self.settings, self.trainer, self.metrics = settings, trainer, metrics
        self._lineage, self._adopt_lineage = lineage, adopt_lineage
        self._run_train, self._apply_configure = run_train, apply_configure
        self._mapping, self._peer_saved, self._peer_reset = mapping, peer_saved, peer_reset
        self.stopping = threading.Event()
        self.rendezvous = rendezvous.Rendezvous(
            settings.rendezvous, settings.replica, settle_s=settings.settle_s, stopping=self.stopping
        )
        self._store_host: Any = None
        self.inbox = Inbox()
        self._saved: int | None = None
        self._digest: tuple[int, str] | None = None  # (step, digest) of the served weights
        self.membership: rendezvous.Membership | None = None
        self.in_sync: bool | None = None
        self.running = False  # a shared train request runs (whoever sent it)
        # Every exchange compares all members' (step, digest): how many steps were compared, how many differed.
        self.compared_steps: set[int] = set()
        self.last_compared_step: int | None = None  # not max(compared_steps): a restore goes back
        self.out_of_sync = 0
        self._thread: threading.Thread | None = None

    # ---- the service's side ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self.settings.host_store:
            self._store_host = rendezvous.host_store(self.settings.rendezvous)
        self._thread = threading.Thread(target=self._loop, name="replica-group", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Leave the group (the others re-form without this member) and end the thread."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def formed(self) -> bool:
        return self.membership is not None

    @property
    def leader(self) -> bool:
        """Rank 0 of a formed group: the member that writes interval checkpoints."""
        return self.membership is not None and self.membership.rank == 0

    def submit_train(self, request: TrainRequest, done: Done) -> None:
        if not self.formed:
            raise ProtocolError(
                "not_connected", "the replica group is forming; train after it has formed (seconds)"
            )
        # The service answers 409 while this replica's own request runs. One that came through another
        # replica is not refused: this one waits its turn (a client that spreads its requests over the
        # replicas behind one Service would otherwise see 409s at random).
        if not self.inbox.trains.empty():
            raise ProtocolError("busy", "a train request is already waiting in this replica")
        self.inbox.trains.put(Job(request.to_body(), done))

    def submit_configure(self, request: ConfigureRequest, done: Done) -> bool:
        """Queue a configure for the whole group; False when no group is formed (the caller applies it here,
        and the next formation hands the source's config to every member)."""
        if not self.formed:
            return False
        self.inbox.configures.put(Job(request.to_body(), done))
        return True

    def submit_reset(
        self, name: str, run: Callable[[], tuple[Reply | ProtocolError, bool]], done: Done
    ) -> None:
        """Queue a restore or rollback: at the next exchange `run` applies it here, then every other member
        takes these weights, optimizer state and version; `done` gets `run`'s reply."""
        if not self.formed:
            # Applied here alone, the next formation would hand the furthest-trained member's weights back.
            raise ProtocolError(
                "not_connected",
                f"the replica group is forming; send the {name} after it has formed (seconds)",
            )
        if not self.inbox.resets.empty():
            raise ProtocolError("busy", "a restore or rollback is already waiting in this replica")
        self.inbox.resets.put(Reset(name, run, done))

    def note_saved(self, step: int) -> None:
        """This member wrote a checkpoint of `step`: the others mark those weights saved too."""
        self._saved = step

    def status(self) -> dict[str, Any]:
        m = self.membership
        return {
            "replica": self.settings.replica,
            "state": "formed" if m else "forming",
            "rank": m.rank if m else None,
            "size": m.size if m else 0,
            "members": list(m.members) if m else [],
            "epoch": m.epoch if m else 0,
            "in_sync": self.in_sync,
            "digest": self._digest[1] if self._digest else None,
            "compared_steps": len(self.compared_steps),
            "last_compared_step": self.last_compared_step,
            "out_of_sync": self.out_of_sync,
        }

    # ---- the thread ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping.is_set():
            if self._mapping() is None:  # nothing to train or to send before the weights are mapped
                self.stopping.wait(0.2)
                continue
            try:
                membership = self.rendezvous.join()
            except InterruptedError:
                break
            reason = self._serve(membership)
            self.metrics.group_regroups.labels(reason=reason).inc()
            if not self.stopping.is_set():
                try:
                    self.rendezvous.ask_new_epoch(membership.epoch)
                except RuntimeError:
                    self.rendezvous.forget_store()
        self.inbox.fail_all("the worker is leaving the replica group")

    def _serve(self, membership: rendezvous.Membership) -> str:
        """Form the group of `membership` and run it until it re-forms. Returns why it ended."""
        mapping = self._mapping()
        device = self.trainer.named_params[0][1].device if self.trainer.named_params else torch.device("cpu")
        comms: Comms | None = None
        try:
            comms = Comms(
                self.rendezvous.store,
                epoch=membership.epoch,
                rank=membership.rank,
                size=membership.size,
                timeout_s=self.settings.timeout_s,
                device=device,
                on_reduce=self.metrics.allreduce_seconds.observe,
                tensor_backend=self.settings.tensor_backend,
            )
            synced = self._synchronize(comms)
            self._enter(comms, membership)
            log.info(
                "replica group formed",
                extra={
                    "event": "group_formed",
                    "epoch": membership.epoch,
                    "members": list(membership.members),
                    "rank": membership.rank,
                    "source_rank": synced.source,
                    "weights_sent": synced.weights_sent,
                    "step": synced.step,
                },
            )
            return self._ticks(comms, membership, mapping)
        except GroupBroken as err:
            log.warning(
                "replica group broke: %s", err, extra={"event": "group_broken", "epoch": membership.epoch}
            )
            return "broken"
        except Exception:  # a bug must not end the thread: this member leaves and joins again, after a rest
            log.exception("replica group failed", extra={"event": "group_failed", "epoch": membership.epoch})
            self.stopping.wait(1.0)
            return "error"
        finally:
            self._leave()

    def _synchronize(self, comms: Comms, source: int | None = None) -> state.Synced:
        """Every member takes the source's weights, optimizer state and version (state.synchronize)."""
        synced = state.synchronize(comms, self.trainer, self._lineage(), source=source)
        self._adopt_lineage(synced.lineage)
        self.metrics.group_weight_broadcasts.inc(int(synced.weights_sent))
        self._digest = (synced.step, synced.digest)
        return synced

    def _enter(self, comms: Comms, membership: rendezvous.Membership) -> None:
        params = [p for _, p in self.trainer.named_params]

        def sum_gradients(loss: float, tokens: int) -> tuple[float, int]:
            total_loss, total_tokens = comms.sum_scalars([loss, float(tokens)])
            fault_point("group.mid_step")  # crash tests: die between the two collectives of a step
            comms.sum_gradients_(params)
            return total_loss, int(total_tokens)

        self.trainer.shard = (membership.rank, membership.size)
        self.trainer.sum_gradients = sum_gradients
        self.membership = membership
        self.metrics.group_size.set(membership.size)
        self.metrics.group_epoch.set(membership.epoch)

    def _leave(self) -> None:
        # Configures queued for the group that it never applied: apply them here (this member's config is
        # what a later formation hands on if this member is the source) and answer.
        for job in self.inbox.configures.drain():
            job.done(self._apply(job.body))
        self.trainer.shard, self.trainer.sum_gradients = (0, 1), None
        self.membership, self.in_sync, self.running = None, None, False
        self.metrics.group_size.set(0)
        self.metrics.group_in_sync.set(0)

    def _control(self, membership: rendezvous.Membership, mapping: object, **fields: Any) -> plan.Control:
        try:
            epoch_seen = self.rendezvous.epoch()
        except RuntimeError:  # the store is gone: the group keeps training; a re-form waits for the store
            self.rendezvous.forget_store()
            epoch_seen = membership.epoch
        saved, self._saved = self._saved, None
        return plan.Control(
            replica=self.settings.replica,
            epoch_seen=epoch_seen,
            leaving=self.stopping.is_set() or self._mapping() is not mapping,
            step=self.trainer.counters.step,
            digest=self._current_digest(),
            saved_step=saved,
            **fields,
        )

    def _current_digest(self) -> str:
        step = self.trainer.counters.step
        if self._digest is None or self._digest[0] != step:
            with self.trainer.lock:
                self._digest = (step, weights_digest([p for _, p in self.trainer.named_params]))
        return self._digest[1]

    def _exchange(
        self, comms: Comms, membership: rendezvous.Membership, mapping: object, **fields: Any
    ) -> plan.Decision:
        mine = self._control(
            membership, mapping, configure=tuple(job.body for job in self.inbox.configures.peek()), **fields
        )
        controls = [plan.Control.from_wire(c) for c in comms.gather_json(mine.to_wire())]
        decision = plan.decide(controls, membership.epoch)
        if decision.out_of_step:
            raise GroupBroken(f"members are out of step: {[(c.replica, c.phase) for c in controls]}")
        for origin, body in decision.configure:
            self._configure(origin == membership.rank, body)
        for step in decision.saved_steps:
            if step == self.trainer.counters.step:
                self._peer_saved(step)
        self.in_sync = decision.in_sync
        self.metrics.group_in_sync.set(1 if decision.in_sync else 0)
        if decision.in_sync is not None:
            self.compared_steps.add(controls[0].step)
            self.last_compared_step = controls[0].step
        if decision.in_sync is False:
            self.out_of_sync += 1
            self.metrics.group_out_of_sync.inc()
            log.error(
                "replicas hold different weights",
                extra={
                    "event": "group_out_of_sync",
                    "states": [(c.replica, c.step, c.digest) for c in controls],
                },
            )
        return decision

    def _ticks(self, comms: Comms, membership: rendezvous.Membership, mapping: object) -> str:
        while True:
            job = None if self.stopping.is_set() else self.inbox.trains.take()
            reset = None if self.stopping.is_set() else self.inbox.resets.take()
            decision = self._exchange(
                comms,
                membership,
                mapping,
                job=job.body if job is not None else None,
                reset=reset is not None,
            )
            if decision.regroup:  # not started anywhere: they run once the group has formed again
                if job is not None:
                    self.inbox.trains.put(job)
                if reset is not None:
                    self.inbox.resets.put(reset)
                return "leaving" if self.stopping.is_set() else "membership"
            for origin in decision.resets:
                self._reset(comms, origin, reset if origin == membership.rank else None)
            for origin, body in decision.jobs:
                if self._train(comms, membership, mapping, body, job if origin == membership.rank else None):
                    return "leaving" if self.stopping.is_set() else "membership"
            if not decision.jobs:
                self.stopping.wait(self.settings.idle_s)

    def _train(
        self,
        comms: Comms,
        membership: rendezvous.Membership,
        mapping: object,
        body: dict[str, Any],
        mine: Job | None,
    ) -> bool:
        """Run one shared train request on this member; answer it here if it came here. Returns whether the
        group re-forms after it (a member leaves or joins: the request stopped early, "regrouping")."""
        request = TrainRequest.from_body(body)
        deadline = time.monotonic() + request.timeout_s  # every member started it at the same exchange
        regroup = False

        def should_stop() -> str | None:
            nonlocal regroup
            local = plan.Stop.NONE
            if self.stopping.is_set():
                local = plan.Stop.SHUTDOWN
            elif time.monotonic() > deadline:
                local = plan.Stop.TIMEOUT
            decision = self._exchange(comms, membership, mapping, phase="step", stop=local)
            regroup = regroup or decision.regroup
            if decision.stop >= plan.Stop.REGROUP:
                return "regrouping"
            if decision.stop == plan.Stop.TIMEOUT:
                raise ProtocolError(
                    "timeout",
                    f"train did not finish within timeout_s={request.timeout_s:g}; the steps done so far are "
                    f"applied on every replica (weights at step {self.trainer.counters.step})",
                )
            return "paused" if self.trainer.config.paused else None

        self.running = True
        try:
            result: TrainReply | ProtocolError = self._run_train(
                request, should_stop, state.RequestConsensus(comms)
            )
        except GroupBroken as err:
            if mine is not None:
                mine.done(
                    ProtocolError(
                        "not_connected",
                        f"a replica left mid-step ({err}); the steps answered so far are applied on every "
                        f"replica (weights at step {self.trainer.counters.step})",
                    )
                )
            raise
        except ProtocolError as err:
            result = err
        except Exception as err:  # met here only: the others are still in the request; re-form the group
            if mine is not None:
                mine.done(ProtocolError("internal", f"train failed: {type(err).__name__}: {err}"))
            raise GroupBroken(f"train failed on this member: {type(err).__name__}: {err}") from err
        finally:
            self.running = False
        if mine is not None:
            mine.done(result)
        return regroup

    def _reset(self, comms: Comms, origin: int, mine: Reset | None) -> None:
        """One restore or rollback: it runs on its origin, then every member takes the origin's state."""
        result, saved = mine.run() if mine is not None else (None, False)
        try:
            outcome = comms.gather_json({"ok": not isinstance(result, ProtocolError), "saved": saved})[origin]
            if outcome["ok"]:
                synced = self._synchronize(comms, source=origin)
                if mine is None:
                    self._peer_reset(bool(outcome["saved"]))
                log.info(
                    "replica group took a member's state",
                    extra={"event": "group_reset", "source_rank": origin, "step": synced.step},
                )
        except GroupBroken as err:
            if mine is not None:  # the group re-forms from the furthest-trained member, which may undo it
                mine.done(
                    ProtocolError(
                        "not_connected",
                        f"a replica left during the {mine.name} ({err}); the group forms again from the "
                        f"furthest-trained replica: send the {mine.name} again once it has formed",
                    )
                )
            raise
        if mine is not None and result is not None:
            mine.done(result)

    def _configure(self, here: bool, body: dict[str, Any]) -> None:
        """Apply one configure of the group's decision; answer it if it came here (it is first in the queue)."""
        job = self.inbox.configures.take() if here else None
        result = self._apply(body)
        if job is not None:
            job.done(result)

    def _apply(self, body: dict[str, Any]) -> ConfigureReply | ProtocolError:
        try:
            return self._apply_configure(ConfigureRequest.from_body(body))
        except ProtocolError as err:
            return err
