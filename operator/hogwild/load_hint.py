"""The load-hint file: how many serving requests are in flight, written by the vLLM plugin, read by the worker.

A contract between the two containers, like `hogwild.handles`: the plugin's middleware
(`hogwild.vllm_plugin.in_flight`) writes it through `LoadHint` at every arrival and completion, with a
heartbeat while any request is in flight; the worker's serving protection (`hogwild.worker.protection`) reads
it, on the host or, through the gate word, in the GPU itself. It lives in the run dir, memory-backed (a pod's
emptyDir; /dev/shm in local mode), so that the GPU-side wait can page-lock it. No torch here: the vLLM side
imports it.

Layout (64 bytes, little-endian):
- 0: header `<4sIqqd`: magic `HWSL`, version, requests in flight, update counter, wall time of the update.
- 32: the gate word (version 2): byte 0 the server's (1: no request in flight), byte 1 the trainer's (1: train
  anyway). One writer per byte, so plain byte stores never overwrite the other side's.
A reader takes version 1 too (no gate word). A "busy" hint that has not changed for HINT_STALE_S was left by a
writer that died mid-request.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

HINT_NAME = "serving-load"
_HINT = struct.Struct("<4sIqqd")
_HINT_MAGIC = b"HWSL"
_HINT_VERSION = 2  # 2: the gate word below; a reader takes 1 too (without it)
_VERSIONS = (1, 2)
GATE_VERSION = 2  # the first version with the gate word
HINT_BYTES = 64
GATE_OFFSET = _HINT.size
SERVER_IDLE_BYTE = GATE_OFFSET
TRAINER_OPEN_BYTE = GATE_OFFSET + 1
HINT_STALE_S = 10.0


class LoadHint:
    """The writer side: the server sets the number of requests it has in flight (arrived, not finished).

    One writer per file. Readers map the same file; a plain aligned 8-byte store is what they read, so no lock
    is needed.
    """

    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> None:
        # Wall time stamps the updates (readers in another process compare it with theirs); tests inject one.
        self._clock = clock
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            header = _HINT.pack(_HINT_MAGIC, _HINT_VERSION, 0, 0, self._clock())
            f.write((header + b"\1").ljust(HINT_BYTES, b"\0"))  # idle: no request yet
        os.replace(tmp, self.path)
        self._file = open(self.path, "r+b")  # noqa: SIM115 - kept open for the mapping's lifetime
        self._map = mmap.mmap(self._file.fileno(), HINT_BYTES)
        self._updates = 0
        self.active = 0

    def set(self, active: int) -> None:
        self.active = active
        self._updates += 1
        self._map[: _HINT.size] = _HINT.pack(_HINT_MAGIC, _HINT_VERSION, active, self._updates, self._clock())
        self._map[SERVER_IDLE_BYTE] = 0 if active > 0 else 1

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._map.close()
            self._file.close()


def hint_version(buffer: bytes) -> int | None:
    """The version of a hint file's header, or None if it is not one."""
    if len(buffer) < _HINT.size:
        return None
    magic, version = _HINT.unpack_from(buffer)[:2]
    return int(version) if magic == _HINT_MAGIC else None


def read_hint(buffer: bytes) -> tuple[int, float] | None:
    """(requests in flight, wall time of the update) from a hint file's bytes, or None if it is not one."""
    if hint_version(buffer) not in _VERSIONS:
        return None
    _, _, active, _, updated = _HINT.unpack_from(buffer)
    return int(active), float(updated)


def pack_header(version: int, active: int, updates: int, wall_time: float) -> bytes:
    """A header as a writer of `version` lays it out (tests: a version-1 server, a foreign file)."""
    return _HINT.pack(_HINT_MAGIC, version, active, updates, wall_time)
