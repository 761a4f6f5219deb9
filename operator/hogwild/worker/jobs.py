"""The worker's jobs: one slot for train requests, one for checkpoints, restores and rollbacks.

A slot holds at most one job. Its flag (`running`) goes up before the job can start, since a job that ends at
once must find it up to take it down, and it drops before the job's reply goes out, so a client that got its
reply never sees the job still running (flags, not Thread.is_alive()). A job runs on a thread of its own, or
is handed to the replica group's thread (`start` gets the `finished` callback either way). A job that raises
answers an error that names it, and the worker lives on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from hogwild.protocol import ProtocolError, Reply

log = logging.getLogger("hogwild.worker")
Done = Callable[[Reply | ProtocolError], None]


def attempt(name: str, job: Callable[[], Reply]) -> Reply | ProtocolError:
    """`job()`, or the error it raised, as a reply (a bug answers `internal` and is logged)."""
    try:
        return job()
    except ProtocolError as err:
        return err
    except Exception as err:  # a failed job answers an error; the worker lives on
        log.exception("%s failed", name, extra={"event": f"{name}_failed"})
        return ProtocolError("internal", f"{name} failed: {type(err).__name__}: {err}")


def on_thread(name: str, job: Callable[[], Reply], done: Done) -> threading.Thread:
    """Run `job` on a thread named after it; `done` gets its reply."""
    thread = threading.Thread(target=lambda: done(attempt(name, job)), name=name, daemon=True)
    thread.start()
    return thread


class Slot:
    def __init__(self, refusal: str, on_change: Callable[[bool], None] = lambda running: None) -> None:
        self.refusal = refusal  # the `busy` message while a job holds the slot
        self.running = False
        self.thread: threading.Thread | None = None  # the last job's own thread, joined at shutdown
        self._on_change = on_change

    def start(self, start: Callable[[Done], threading.Thread | None], done: Done) -> None:
        """Take the slot and call `start(finished)`, which starts the job (its own thread, returned, or the
        group's). A refusal from `start` (a ProtocolError) frees the slot again and goes to the caller."""
        if self.running:
            raise ProtocolError("busy", self.refusal)

        def finished(result: Reply | ProtocolError) -> None:
            self._set(False)
            done(result)

        self._set(True)
        try:
            self.thread = start(finished) or self.thread
        except ProtocolError:
            self._set(False)
            raise

    def _set(self, running: bool) -> None:
        self.running = running
        self._on_change(running)
