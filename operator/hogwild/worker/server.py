"""The worker's ZMQ server: decode, dispatch to the service, encode. Nothing else happens here.

- ROUTER on `ipc://<run dir>/worker.sock`: the vLLM router in the same pod (filesystem permissions guard it).
- ROUTER on `tcp://*:<control port>` only when CURVE keys are configured: the operator. The socket is a CURVE
  server, and a ZAP authenticator accepts exactly one client public key; anyone else's handshake fails and
  gets no answer at all, and a plaintext peer cannot even start one.

Jobs (train, checkpoint, restore) answer from their own threads; ZMQ sockets are not thread-safe, so they
put the reply on a queue and wake the loop through an inproc socket, and only this thread touches the
ROUTER sockets. A malformed, unknown or wrong-version frame gets an error reply; nothing a peer sends ends
the loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from hogwild import defaults
from hogwild.auth import CurveKeys
from hogwild.protocol import (
    CONTROL_ONLY,
    MAX_FRAME_BYTES,
    ProtocolError,
    decode_request,
    encode_error,
    encode_reply,
    request_id_of,
)

log = logging.getLogger("hogwild.worker")
POLL_MS = 250
ZAP_DOMAIN = "hogwild"


class OnlyKey:
    """ZAP credentials provider: accept exactly the operator's public key (Z85)."""

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.public_key


class WorkerServer:
    def __init__(
        self,
        service: Any,  # hogwild.worker.service.WorkerService (Any keeps this module free of torch)
        *,
        ipc_path: str,
        curve: CurveKeys | None = None,
        control_port: int = defaults.WORKER_CONTROL_PORT,
        control_host: str = "*",
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.service = service
        self.context = zmq.Context()
        self._outbox: queue.Queue[tuple[zmq.Socket[bytes], list[bytes], bytes]] = queue.Queue()
        self._wake_lock = threading.Lock()
        self._stop = threading.Event()
        self._on_error = on_error
        self.sockets: list[zmq.Socket[bytes]] = []
        self.auth: ThreadAuthenticator | None = None
        self.ipc_endpoint = f"ipc://{ipc_path}"
        self.sockets.append(self._router(self.ipc_endpoint))  # first: the vLLM socket (CONTROL_ONLY refused)
        self.tcp_endpoint: str | None = None
        if curve is not None:
            self.auth = ThreadAuthenticator(self.context)
            self.auth.start()
            self.auth.configure_curve_callback(
                domain=ZAP_DOMAIN, credentials_provider=OnlyKey(curve.peer_public)
            )
            tcp = self._router(None)
            tcp.curve_server = True
            tcp.curve_publickey = curve.public
            tcp.curve_secretkey = curve.secret
            tcp.zap_domain = ZAP_DOMAIN.encode()
            if control_port == 0:
                port = tcp.bind_to_random_port(f"tcp://{control_host}")
            else:
                tcp.bind(f"tcp://{control_host}:{control_port}")
                port = control_port
            self.tcp_endpoint = f"tcp://{control_host}:{port}"
            self.sockets.append(tcp)
        self._wake_endpoint = f"inproc://wake-{id(self)}"
        self._wake_rx = self.context.socket(zmq.PULL)
        self._wake_rx.bind(self._wake_endpoint)
        self._wake_tx = self.context.socket(zmq.PUSH)
        self._wake_tx.connect(self._wake_endpoint)

    def _router(self, endpoint: str | None) -> zmq.Socket[bytes]:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Frames up to 8x the largest valid request reach Python and get a `too_large` reply; libzmq drops a
        # bigger one (and the peer's connection) before it is buffered, so no peer can exhaust memory.
        sock.setsockopt(zmq.MAXMSGSIZE, 8 * MAX_FRAME_BYTES)
        if endpoint is not None:
            sock.bind(endpoint)
        return sock

    # ---- replies ----------------------------------------------------------------------------------------
    def _reply_later(
        self, sock: zmq.Socket[bytes], envelope: list[bytes], request_id: str
    ) -> Callable[[Any], None]:
        def done(result: dict[str, Any] | ProtocolError) -> None:
            if isinstance(result, ProtocolError):
                self.service.metrics.errors.labels(code=result.code).inc()
                frame = encode_error(request_id, result)
            else:
                try:
                    frame = encode_reply(request_id, result)
                except ValueError as err:  # e.g. a NaN that slipped into a reply
                    frame = encode_error(request_id, ProtocolError("internal", f"reply not encodable: {err}"))
            self._outbox.put((sock, envelope, frame))
            if threading.current_thread() is not self._loop_thread:
                with self._wake_lock:
                    self._wake_tx.send(b"")

        return done

    def _flush(self) -> None:
        while True:
            try:
                sock, envelope, frame = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                sock.send_multipart([*envelope, frame], flags=zmq.NOBLOCK)
            except zmq.ZMQError as err:  # the peer went away (ROUTER drops it); nothing to answer
                log.warning("reply not sent: %s", err, extra={"event": "reply_dropped"})

    # ---- the loop ----------------------------------------------------------------------------------------
    def _on_frames(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        envelope, frame = frames[:-1], frames[-1]
        done = self._reply_later(sock, envelope, "")
        try:
            done = self._reply_later(sock, envelope, request_id_of(frame))
            request_id, request = decode_request(frame)
            done = self._reply_later(sock, envelope, request_id)
            if request.type in CONTROL_ONLY and sock is self.sockets[0]:
                raise ProtocolError(
                    "unauthorized", f"{request.type} comes from the operator's control channel only"
                )
            self.service.handle(request, done)
        except ProtocolError as err:
            done(err)
        except Exception as err:  # a bug in a handler must not end the loop
            log.exception("request failed", extra={"event": "request_failed"})
            done(ProtocolError("internal", f"{type(err).__name__}: {err}"))

    def serve_forever(self) -> None:
        """Run until `stop()`; calls `service.tick()` between messages (watcher, interval checkpoints)."""
        self._loop_thread = threading.current_thread()
        poller = zmq.Poller()
        for sock in [*self.sockets, self._wake_rx]:
            poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(POLL_MS))
            if self._wake_rx in ready:
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
            for sock in self.sockets:
                while sock in ready and sock.poll(0):
                    self._on_frames(sock, sock.recv_multipart())
            self._flush()
            try:
                self.service.tick()
            except Exception:
                log.exception("tick failed", extra={"event": "tick_failed"})
            self._flush()

    def stop(self) -> None:
        self._stop.set()

    def drain(self) -> None:
        """Send the replies that jobs left (after the service shut down), then close everything."""
        self._flush()
        for sock in [*self.sockets, self._wake_rx, self._wake_tx]:
            sock.close(linger=100)
        if self.auth is not None:
            self.auth.stop()
        self.context.term()

    _loop_thread: threading.Thread | None = None
