"""Async ZMQ client of the training worker: the router (vLLM routes) and the operator use it.

One DEALER socket; requests carry ids and replies are matched to waiting futures, so a quick `status` goes
through while a long `train` is still in flight. Never blocks the caller's event loop.

A worker can die under a request (kill -9, OOM) and come back as a new process; its reply never comes. So a
long request is watched (`request_watched`): a `status` heartbeat every HEARTBEAT_S, and the request fails
with `not_connected` as soon as another incarnation answers, or when nothing has answered for
DEAD_AFTER_S. The socket sets ZMQ_IMMEDIATE: nothing queues for a peer that is gone, so a request meant for
the dead worker is never delivered to the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TypeVar, cast

import zmq
import zmq.asyncio

from hogwild.auth import CurveKeys
from hogwild.protocol import (
    Answered,
    ProtocolError,
    StatusReply,
    StatusRequest,
    decode_reply,
    encode_request,
    new_id,
    request_id_of,
)

log = logging.getLogger("hogwild.client")
HEARTBEAT_S = 1.0
DEAD_AFTER_S = 10.0
ReplyT = TypeVar("ReplyT")


def liveness_verdict(
    kind: str,
    baseline: StatusReply,
    seen: StatusReply | None,
    silent_s: float,
    last: StatusReply | None = None,
) -> str | None:
    """Why a `kind` request in flight is lost, or None while the worker that took it still answers. Pure.

    `baseline`: the status read before the request was sent; `seen`: the latest heartbeat's status (None when
    it got no answer); `silent_s`: how long nothing has answered; `last`: the latest status of the worker
    that took the request (its step says how many of the request's steps are surely applied)."""
    was = baseline.get("incarnation")
    if seen is not None and (was is None or seen.get("incarnation") == was):
        return None
    if seen is None and silent_s < DEAD_AFTER_S:
        return None
    what = (
        "restarted (another worker process answers now)"
        if seen is not None
        else f"stopped answering for {silent_s:.0f} s (dead or hung)"
    )
    if kind == "train":
        start, now = baseline.get("step"), (last or baseline).get("step")
        done = now - start if isinstance(start, int) and isinstance(now, int) else 0
        outcome = (
            f"it was at step {start} when this request started and at step {now} when last heard from, so at "
            f"least {done} of this request's steps are in the served weights (maybe more), unacknowledged and "
            "not checkpointed: read /train/status"
        )
    elif kind == "checkpoint":
        outcome = "no checkpoint was acknowledged; the previous complete checkpoint is untouched"
    else:
        outcome = "the request was not acknowledged"
    return f"the training worker {what} during {kind}: {outcome}"


class WorkerClient:
    def __init__(self, address: str, curve: CurveKeys | None = None) -> None:
        self.address = address
        self._curve = curve
        self._context = zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._reader: asyncio.Task[None] | None = None
        # When the worker last sent anything (a late reply too): a worker slow to answer is not a dead one.
        self.last_heard = 0.0

    def _connect(self) -> zmq.asyncio.Socket:
        if self._socket is None:
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.IMMEDIATE, 1)
            if self._curve is not None:
                socket.curve_publickey = self._curve.public
                socket.curve_secretkey = self._curve.secret
                socket.curve_serverkey = self._curve.peer_public
            socket.connect(self.address)
            self._socket = socket
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())
        return self._socket

    async def _read_replies(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            self.last_heard = time.monotonic()
            try:
                frame = frames[-1]
                future = self._pending.pop(request_id_of(frame), None)
                if future is not None and not future.done():
                    future.set_result(frame)
            except Exception:  # whatever arrives, this reader must live on: every request depends on it
                log.exception("hogwild: unreadable reply from the worker")

    async def request(self, request: Answered[ReplyT], timeout_s: float) -> ReplyT:
        """Send one request and wait for its reply's fields (the envelope's `id` matched it and is dropped).
        Raises ProtocolError (remote error, or timeout)."""
        socket = self._connect()
        request_id = new_id()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future

        async def send_and_wait() -> bytes:
            # With ZMQ_IMMEDIATE the send itself waits while no worker is connected: it is under the timeout.
            await socket.send_multipart([b"", encode_request(request, request_id)])
            return await future

        try:
            frame = await asyncio.wait_for(send_and_wait(), timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError(
                "timeout", f"the training worker did not answer {request.type} within {timeout_s:.0f} s"
            ) from None
        finally:
            self._pending.pop(request_id, None)
        fields = decode_reply(frame)
        fields.pop("id", None)
        # The worker speaks this protocol's release (its version is checked): its fields are this request's reply.
        return cast(ReplyT, fields)

    async def request_watched(
        self, request: Answered[ReplyT], timeout_s: float, baseline: StatusReply
    ) -> ReplyT:
        """`request`, failed early with `not_connected` when the worker that took it dies or restarts.

        `baseline` is a status read just before (it names the worker's incarnation)."""
        task = asyncio.ensure_future(self.request(request, timeout_s))
        answered, last = time.monotonic(), baseline
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_S)
                if done:
                    return task.result()
                try:
                    seen: StatusReply | None = await self.request(StatusRequest(), 2 * HEARTBEAT_S)
                except ProtocolError:
                    seen = None
                silent_s = time.monotonic() - max(answered, self.last_heard)
                verdict = liveness_verdict(request.type, baseline, seen, silent_s, last)
                if verdict is None and seen is not None:
                    last = seen
                if verdict is not None and not task.done():
                    log.warning("hogwild: %s", verdict)
                    raise ProtocolError("not_connected", verdict)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ProtocolError):
                    await task

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket, self._reader = None, None
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
