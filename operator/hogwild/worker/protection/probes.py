"""How busy the server is, as the gate reads it: the load-hint file (`HintFileProbe`, the format in
`hogwild.load_hint`), or vLLM's `/metrics` where no hint file exists (`MetricsProbe`: running + waiting
requests; coarser).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from hogwild.load_hint import HINT_BYTES, HINT_NAME, HINT_STALE_S, read_hint


class LoadProbe(Protocol):
    """Whether the server has requests in flight right now."""

    def busy(self) -> bool: ...


class HintFileProbe:
    """Reads a `LoadHint` file. A missing, foreign or stale file reads as idle: training is never stuck."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        stale_s: float = HINT_STALE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock  # the writer's kind of time (wall), injectable for tests
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
        hint = read_hint(mapping[:HINT_BYTES])
        if hint is None:
            return False
        active, updated = hint
        return active > 0 and self._clock() - updated < self.stale_s


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
