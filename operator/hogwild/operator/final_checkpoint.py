"""The final checkpoint before a session's pod goes (a restart-requiring change, or a delete), then the delete.

The checkpoint request runs as a background task, one per session and pod, so that no handler holds the
session for the whole wait: the reconcile reports "Restarting: waiting up to N s" at once and looks at the
task on each pass (the status timer drives it), and a delete arriving meanwhile takes over the same task
instead of queueing behind it or asking again. A busy worker (a /train in flight) is asked again until the
bound. The delete waits in its handler (the finalizer must stay until the checkpoint is done), after writing
Terminating to the status, and stops waiting as soon as the pod or the checkpoint volume is being deleted.
What to wait for, and for how long, is decided in `stopping` (pure).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hogwild.operator import builders, pod_builder, status, stopping
from hogwild.operator.kube import Kube
from hogwild.operator.options import OperatorOptions
from hogwild.operator.relay import Relay, Target
from hogwild.operator.spec import SessionSpec
from hogwild.protocol import CheckpointReply, CheckpointRequest, ProtocolError

logger = logging.getLogger(__name__)
# Posts a Kubernetes Event about the session: (body, type Normal|Warning, reason, message).
EventSink = Callable[[Mapping[str, Any], str, str, str], None]


@dataclass
class Job:
    pod_uid: str
    pod_name: str
    task: asyncio.Task[CheckpointReply]
    wait: stopping.Bound
    until: str  # RFC 3339, for messages
    deadline: float  # monotonic


def _iso_in(seconds: float) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _where(reply: CheckpointReply) -> str:
    step, path = reply.get("step"), reply.get("path")  # .get: a worker of another release may say less
    return f"step {step} at {path}" if path else "done"


class PodStopper:
    def __init__(self, options: OperatorOptions, kube: Kube, relay: Relay, emit: EventSink) -> None:
        self.options, self.kube, self.relay, self.emit = options, kube, relay, emit
        self._jobs: dict[str, Job] = {}  # session uid -> the checkpoint asked for before its pod goes

    def bound(self, spec: SessionSpec) -> stopping.Bound:
        return stopping.bound(spec.checkpoint.timeout_s, self.options.final_checkpoint_timeout_s)

    def forget(self, uid: str) -> None:
        """The pod stays after all (the spec went back), or the session is gone: stop waiting."""
        job = self._jobs.pop(uid, None)
        if job is not None:
            job.task.cancel()

    def _job(self, uid: str, pod_uid: str) -> Job | None:
        job = self._jobs.get(uid)
        if job is not None and job.pod_uid != pod_uid:  # asked of a pod that is gone
            self.forget(uid)
            return None
        return job

    def _start(
        self, uid: str, pod: status.PodFacts, target: Target, reason: str, wait: stopping.Bound
    ) -> Job:
        task = asyncio.get_running_loop().create_task(self._ask(target, reason, wait.wait_s))
        job = Job(pod.uid, pod.name, task, wait, _iso_in(wait.wait_s), time.monotonic() + wait.wait_s)
        self._jobs[uid] = job
        return job

    async def _ask(self, target: Target, reason: str, wait_s: float) -> CheckpointReply:
        deadline = time.monotonic() + wait_s
        while True:
            left = max(deadline - time.monotonic(), 0.1)
            try:
                return await self.relay.request(target, CheckpointRequest(reason=reason), left)
            except ProtocolError as err:
                if err.code != "busy" or deadline - time.monotonic() <= self.options.restart_poll_s:
                    raise
            await asyncio.sleep(self.options.restart_poll_s)

    def _report(self, body: Mapping[str, Any], job: Job, action: str) -> None:
        """The Event for a finished (or overdue) checkpoint request."""
        error: BaseException | None
        if not job.task.done():
            job.task.cancel()
            error = ProtocolError("timeout", f"no answer within {job.wait.wait_s:g} s")
        elif job.task.cancelled():
            error = ProtocolError("cancelled", "the request was dropped")
        else:
            error = job.task.exception()
        if error is None:
            where = _where(job.task.result())
            self.emit(body, "Normal", "Checkpointed", f"final checkpoint before {action}: {where}")
            return
        why = f"{error.code}: {error.message}" if isinstance(error, ProtocolError) else repr(error)
        lost = stopping.lost(body.get("status") or {})
        message = f"final checkpoint failed ({why}); {action} anyway: {lost}"
        self.emit(body, "Warning", "CheckpointFailed", message)

    # ---- a restart ------------------------------------------------------------------------------------
    async def replace(
        self,
        body: Mapping[str, Any],
        session: builders.SessionRef,
        spec: SessionSpec,
        pod: status.PodFacts,
        target: Target | None,
        why: str,
    ) -> str | None:
        """Checkpoint (bounded, in the background), then delete the pod. None once the pod is deleted, else
        what it waits for (for the status)."""
        action = f"replacing pod {pod.name}"
        previous = body.get("status") or {}
        job = self._job(session.uid, pod.uid)
        if job is None:
            wait = self.bound(spec)
            plan = stopping.plan(previous, pod, worker_addressable=target is not None, wait=wait)
            if plan.skip is None and target is not None:
                job = self._start(session.uid, pod, target, "pre-restart", wait)
                self.emit(
                    body, "Normal", stopping.WAITING, stopping.waiting_event(action, wait, job.until, why)
                )
                return f"{why}: {stopping.waiting_status(wait.wait_s, job.until)}"
            self.emit(
                body, "Warning", stopping.SKIPPED, stopping.skipped_event(action, str(plan.skip), previous)
            )
        elif not job.task.done() and time.monotonic() < job.deadline + self.options.restart_poll_s:
            return f"{why}: {stopping.waiting_status(job.wait.wait_s, job.until)}"
        else:
            self._report(body, job, action)
        self.forget(session.uid)
        await self.kube.delete("Pod", session.namespace, pod.name)
        await self.relay.forget(session.namespace, session.name)
        self.emit(body, "Normal", "Restarting", f"replacing pod {pod.name}: {why}")
        logger.info("restart session=%s/%s pod=%s why=%s", session.namespace, session.name, pod.name, why)
        return None

    # ---- a delete -------------------------------------------------------------------------------------
    async def finalize(
        self,
        body: Mapping[str, Any],
        session: builders.SessionRef,
        spec: SessionSpec | None,
        target_for: Callable[[status.PodFacts], Awaitable[Target | None]],
        write_status: Callable[[str, status.PodFacts | None], Awaitable[None]],
        pod_names: Sequence[str] = (),
    ) -> None:
        """Final checkpoint (bounded), then the pod goes. `write_status(message, pod)` writes Terminating at
        once, before any wait. `pod_names`: the session's replica pods, replica 0 first (default: the one pod
        named after the session); one answer is enough (the replica group writes one checkpoint), so the
        first that runs is asked, and only that pod goes here."""
        previous = body.get("status") or {}
        pod = await self._pick(session, pod_names or (session.name,))
        action = f"deleting pod {pod.name}" if pod else "deleting the session"
        job = self._job(session.uid, pod.uid) if pod else None
        if job is None and pod is not None:
            target = await target_for(pod)
            if spec is None:
                plan = stopping.Plan(skip="the spec is invalid, so its checkpoint settings are unknown")
            else:
                plan = stopping.plan(
                    previous,
                    pod,
                    worker_addressable=target is not None,
                    pvc_terminating=await self._pvc_terminating(session, spec),
                    wait=self.bound(spec),
                )
            if plan.skip is None and target is not None and spec is not None:
                job = self._start(session.uid, pod, target, "delete", self.bound(spec))
            else:
                await write_status(f"no final checkpoint ({plan.skip}); the pod goes", pod)
                self.emit(
                    body,
                    "Warning",
                    stopping.SKIPPED,
                    stopping.skipped_event(action, str(plan.skip), previous),
                )
        elif pod is None:
            await write_status("there is no pod; the session goes", None)
        if job is not None:
            await write_status(
                f"{stopping.waiting_status(job.wait.wait_s, job.until)}, then the pod goes", pod
            )
            self.emit(body, "Normal", stopping.WAITING, stopping.waiting_event(action, job.wait, job.until))
            await self._await(body, session, spec, job, action)
        self.forget(session.uid)
        if pod is not None:
            await self.kube.delete("Pod", session.namespace, pod.name)

    async def _await(
        self,
        body: Mapping[str, Any],
        session: builders.SessionRef,
        spec: SessionSpec | None,
        job: Job,
        action: str,
    ) -> None:
        """Until the checkpoint is done, or can no longer come (the pod or the volume is being deleted)."""
        poll = self.options.restart_poll_s
        while not job.task.done() and time.monotonic() < job.deadline + poll:
            await asyncio.wait({job.task}, timeout=poll)  # raises nothing: the task's outcome is read below
            if job.task.done():
                break
            why = await self._cannot_come(session, spec, job.pod_name)
            if why is not None:
                job.task.cancel()
                lost = stopping.abandoned_event(action, why, body.get("status") or {})
                self.emit(body, "Warning", stopping.SKIPPED, lost)
                return
        self._report(body, job, action)

    async def _cannot_come(
        self, session: builders.SessionRef, spec: SessionSpec | None, pod_name: str
    ) -> str | None:
        pod = await self._pod(session, pod_name)
        if pod is None:
            return "the pod is gone"
        if pod.terminating:
            return f"pod {pod.name} is being deleted (its worker checkpoints on SIGTERM)"
        pvc = await self._pvc_terminating(session, spec) if spec is not None else None
        return f"the checkpoint volume {pvc} is being deleted (is the namespace?)" if pvc else None

    async def _pod(self, session: builders.SessionRef, name: str) -> status.PodFacts | None:
        found = await self.kube.get("Pod", session.namespace, name)
        return status.pod_facts(found, pod_builder.POD_HASH_ANNOTATION) if found else None

    async def _pick(self, session: builders.SessionRef, names: Sequence[str]) -> status.PodFacts | None:
        """The pod to ask: the one a checkpoint was already asked of, else the first that runs its trainer
        and is not going, else the first that exists."""
        pods = [pod for name in names if (pod := await self._pod(session, name)) is not None]
        job = self._jobs.get(session.uid)
        asked = [pod for pod in pods if job is not None and pod.uid == job.pod_uid]
        running = [p for p in pods if p.phase == "Running" and p.trainer_running and not p.terminating]
        return next(iter(asked + running + pods), None)

    async def _pvc_terminating(self, session: builders.SessionRef, spec: SessionSpec) -> str | None:
        name = builders.names(session, spec).pvc
        found = await self.kube.get("PersistentVolumeClaim", session.namespace, name)
        return name if found and found["metadata"].get("deletionTimestamp") else None
