"""Async ZMQ client of the training worker: the router (vLLM routes) and the operator use it.

One DEALER socket; requests carry ids and replies are matched to waiting futures, so a quick `status` goes
through while a long `train` is still in flight. Never blocks the caller's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import zmq
import zmq.asyncio

from hogwild.auth import CurveKeys
from hogwild.protocol import ProtocolError, Request, decode_reply, encode_request, new_id, request_id_of


class WorkerClient:
    def __init__(self, address: str, curve: CurveKeys | None = None) -> None:
        self.address = address
        self._curve = curve
        self._context = zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._reader: asyncio.Task[None] | None = None

    def _connect(self) -> zmq.asyncio.Socket:
        if self._socket is None:
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
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
            frame = frames[-1]
            future = self._pending.pop(request_id_of(frame), None)
            if future is not None and not future.done():
                future.set_result(frame)

    async def request(self, request: Request, timeout_s: float) -> dict[str, Any]:
        """Send one request and wait for its reply. Raises ProtocolError (remote error, or timeout)."""
        socket = self._connect()
        request_id = new_id()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await socket.send_multipart([b"", encode_request(request, request_id)])
            frame = await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError(
                "timeout", f"the training worker did not answer {request.type} within {timeout_s:.0f} s"
            ) from None
        finally:
            self._pending.pop(request_id, None)
        return decode_reply(frame)

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
