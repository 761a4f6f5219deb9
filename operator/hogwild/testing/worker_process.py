"""Run `hogwild worker` as a child process and talk to it synchronously (tests, benchmarks, local checks).

`call` is a blocking one-shot client of the worker protocol (a DEALER socket per call; CURVE when keys are
given). Services use the async `hogwild.client.WorkerClient`; tests want plain functions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import zmq

from hogwild import defaults
from hogwild.auth import CurveKeys
from hogwild.protocol import PROTOCOL_VERSION, ProtocolError, decode_reply, new_id
from hogwild.testing.children import child_env


class PendingCall:
    """A request sent now whose reply is collected later (`result`): e.g. a long train while status polls."""

    def __init__(self, address: str, frame: bytes, curve: CurveKeys | None = None) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            self.socket.curve_publickey = curve.public
            self.socket.curve_secretkey = curve.secret
            self.socket.curve_serverkey = curve.peer_public
        self.socket.connect(address)
        self.socket.send_multipart([b"", frame])

    def raw_result(self, wait_s: float) -> bytes | None:
        """The reply frame, or None when nothing came back within `wait_s`."""
        try:
            if not self.socket.poll(int(wait_s * 1000)):
                return None
            return self.socket.recv_multipart()[-1]
        finally:
            self.socket.close(linger=0)

    def result(self, wait_s: float = 60.0) -> dict[str, Any]:
        reply = self.raw_result(wait_s)
        if reply is None:
            raise ProtocolError("timeout", f"no reply within {wait_s} s")
        return decode_reply(reply)


def request_frame(kind: str, **fields: Any) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, "type": kind, "id": new_id(), **fields}).encode()


def call_raw(address: str, frame: bytes, wait_s: float, curve: CurveKeys | None = None) -> bytes | None:
    """Send one raw frame; the reply frame, or None when nothing came back within `wait_s`."""
    return PendingCall(address, frame, curve).raw_result(wait_s)


def call(
    address: str, kind: str, wait_s: float = 60.0, curve: CurveKeys | None = None, **fields: Any
) -> dict[str, Any]:
    """One request; the reply's fields. Raises ProtocolError (remote error, or "timeout")."""
    return PendingCall(address, request_frame(kind, **fields), curve).result(wait_s)


class WorkerProcess:
    """`python -m hogwild.cli worker ...` with its own run and checkpoint dirs; `close()` stops it."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        checkpoint_dir: str | os.PathLike[str],
        *,
        config: Mapping[str, Any] | None = None,
        curve_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.run_dir, self.checkpoint_dir = Path(run_dir), Path(checkpoint_dir)
        self.address = f"ipc://{self.run_dir / defaults.WORKER_SOCKET_NAME}"
        cmd = [
            sys.executable, "-m", "hogwild.cli", "worker", "--run-dir", str(run_dir), "--checkpoint-dir", str(checkpoint_dir),
            "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--control-port", "0", "--control-host", "127.0.0.1",
            "--config", json.dumps(dict(config or {})), *extra_args,
        ]  # fmt: skip
        if curve_dir is not None:
            cmd += ["--curve-dir", str(curve_dir)]
        self.log_path = Path(log_path) if log_path else self.run_dir / "worker.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=child_env(env))

    def call(self, kind: str, wait_s: float = 60.0, **fields: Any) -> dict[str, Any]:
        """One request; `wait_s` is how long this client waits (a train's own `timeout_s` is a field)."""
        return call(self.address, kind, wait_s, **fields)

    def post(self, kind: str, **fields: Any) -> PendingCall:
        """Send a request without waiting for its reply."""
        return PendingCall(self.address, request_frame(kind, **fields))

    def wait_until(self, predicate: Any, timeout_s: float = 60.0, poll_s: float = 0.05) -> dict[str, Any]:
        """Poll `status` until `predicate(status)` holds; return that status. Raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | str = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                last = self.call("status", wait_s=5.0)
            except ProtocolError as err:
                last = err.message
            if isinstance(last, dict) and predicate(last):
                return last
            time.sleep(poll_s)
        raise TimeoutError(
            f"worker condition not met in {timeout_s} s; last status: {last}\n{self.log_tail()}"
        )

    def wait_connected(self, timeout_s: float = 120.0) -> dict[str, Any]:
        return self.wait_until(lambda s: s["connected"], timeout_s)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        self._log.close()
