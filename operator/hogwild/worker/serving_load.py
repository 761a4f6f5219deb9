"""How busy the server is, as the trainer's serving protection reads it (`hogwild.worker.protection`).

The server side publishes how many requests it has in flight in a small shared file (`LoadHint`: the vLLM
plugin's middleware writes it at every arrival and completion, with a heartbeat while any is in flight; a
memory-backed file in the pod's shared run dir). The trainer reads it (`HintFileProbe`), or polls vLLM's
`/metrics` where no hint file exists (`MetricsProbe`: running + waiting requests; coarser). No torch here:
the vLLM side imports the writer.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
import time
import urllib.request
from pathlib import Path
from typing import Protocol

HINT_NAME = "serving-load"
# Layout of the hint file: magic, version, requests in flight, update counter, wall time of the update.
_HINT = struct.Struct("<4sIqqd")
_HINT_MAGIC = b"HWSL"
_HINT_VERSION = 2  # 2: the gate word below; a reader takes 1 too (without it)
_VERSIONS = (1, 2)
GATE_VERSION = 2  # the first version with the gate word
HINT_BYTES = 64
# The gate word (4 bytes) that a GPU can wait on (`hogwild.worker.device_gate`): the server writes its first
# byte (1: no request in flight), the trainer its second (1: train anyway). One writer per byte, so plain
# byte stores never overwrite the other side's.
GATE_OFFSET = _HINT.size
SERVER_IDLE_BYTE = GATE_OFFSET
TRAINER_OPEN_BYTE = GATE_OFFSET + 1
# A hint that says "busy" but has not changed for this long comes from a writer that died mid-request.
HINT_STALE_S = 10.0


class LoadProbe(Protocol):
    """Whether the server has requests in flight right now."""

    def busy(self) -> bool: ...


class LoadHint:
    """The writer side: the server sets the number of requests it has in flight (arrived, not finished).

    One writer per file. Readers map the same file (`HintFileProbe`); a plain aligned 8-byte store is what
    they read, so no lock is needed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            header = _HINT.pack(_HINT_MAGIC, _HINT_VERSION, 0, 0, time.time())
            f.write((header + b"\1").ljust(HINT_BYTES, b"\0"))  # idle: no request yet
        os.replace(tmp, self.path)
        self._file = open(self.path, "r+b")  # noqa: SIM115 - kept open for the mapping's lifetime
        self._map = mmap.mmap(self._file.fileno(), HINT_BYTES)
        self._updates = 0
        self.active = 0

    def set(self, active: int) -> None:
        self.active = active
        self._updates += 1
        self._map[: _HINT.size] = _HINT.pack(_HINT_MAGIC, _HINT_VERSION, active, self._updates, time.time())
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


class HintFileProbe:
    """Reads a `LoadHint` file. A missing, foreign or stale file reads as idle: training is never stuck."""

    def __init__(self, path: str | os.PathLike[str], stale_s: float = HINT_STALE_S) -> None:
        self.path = Path(path)
        self.stale_s = stale_s
        self._map: mmap.mmap | None = None
        self._next_open = 0.0

    def _mapping(self) -> mmap.mmap | None:
        if self._map is None and time.monotonic() >= self._next_open:
            self._next_open = time.monotonic() + 1.0
            try:
                with open(self.path, "rb") as f:
                    self._map = mmap.mmap(f.fileno(), HINT_BYTES, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                self._map = None
        return self._map

    def busy(self) -> bool:
        mapping = self._mapping()
        if mapping is None:
            return False
        hint = read_hint(mapping[: _HINT.size])
        if hint is None:
            return False
        active, updated = hint
        return active > 0 and time.time() - updated < self.stale_s


def parse_vllm_load(metrics_text: str) -> int:
    """Requests running + waiting, summed over every series of vLLM's two gauges (Prometheus text)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(None, 1)[1])
    return int(total)


class MetricsProbe:
    """Polls vLLM's `/metrics` on a thread; `busy()` reads the last answer (coarser than the hint file)."""

    def __init__(self, url: str, interval_s: float = 0.02, timeout_s: float = 0.5) -> None:
        self.url, self.interval_s, self.timeout_s = url, interval_s, timeout_s
        self.active = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serving-load-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with urllib.request.urlopen(self.url, timeout=self.timeout_s) as response:
                    self.active = parse_vllm_load(response.read().decode())
            except OSError:
                self.active = 0  # vLLM unreachable: nothing to protect

    def busy(self) -> bool:
        return self.active > 0

    def close(self) -> None:
        self._stop.set()


def default_probe(run_dir: str | os.PathLike[str], metrics_url: str | None = None) -> LoadProbe:
    """The hint file in the run dir when the server side writes one, else vLLM's metrics when a URL is given."""
    hint = Path(run_dir) / HINT_NAME
    if hint.exists() or not metrics_url:
        return HintFileProbe(hint)
    return MetricsProbe(metrics_url)


def close_probe(probe: object) -> None:
    close = getattr(probe, "close", None)
    if callable(close):
        close()
