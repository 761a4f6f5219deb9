"""Serving protection on the GPU itself: the trainer's stream waits, in the GPU, while the server is busy.

Why: the host-side gate (`gate.ServingGate`) can only stop launching. A serving step that arrives finds
whatever the trainer queued before, so the gate keeps that queue short (`ChunkQueue`, ~2 ms), and the short
queue is what costs training: the host can no longer run ahead of the GPU, so every host stall idles it
(25 % of idle-server training at 1.5B and more at 7B once the projections were cut finer; bench/RESULTS.md).
Here each preemption point enqueues a wait on the load hint's gate word (`load_hint.GATE_OFFSET`) into the
trainer's stream (`cuStreamWaitValue32` on the hint file's page, registered with `cuMemHostRegister`). The GPU
holds the trainer's next chunk there while the server's byte says busy and starts it microseconds after it
says idle. The host launches as it would without protection, and what a serving step can find ahead of it
is the one chunk the GPU is running.

The word's second byte is the trainer's: 1 lets the stream through whatever the server says. A watchdog
thread sets it where the host gate would stop waiting (protection off, a stale hint from a server that died
mid-request, `max_wait_s` of continuous busy, `min_training_share`) and on close, so no enqueued wait can hold
training forever. `run_anyway` is that decision, pure.

For the share, the watchdog accounts each period to the trainer's token bucket (`share`) as held
(busy, gate shut, trainer in a step) or ran (trainer in a step, stream free). A trainer counts as in a step
from its first point until the service says the step ended (`idle`), while it passed a point in the last
ACTIVE_S or is being held: a held stream soon blocks the host on a sync, so it passes no point while held,
and a hold must keep counting then (it did not, and the share never opened the gate on an H200).

Driver calls go through ctypes (`libcuda.so.1`); where any of them fails (no CUDA, a driver without stream
memory operations, a hint file that cannot be page-locked) the worker keeps the host gate.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hogwild import load_hint
from hogwild.config import ServingProtection
from hogwild.typed_calls import cuda_initialized
from hogwild.worker.protection.gate import GateStats
from hogwild.worker.protection.share import TrainingShare

log = logging.getLogger("hogwild.worker")

# The GPU passes a wait when (word & _PASS_MASK) != 0: the server's idle byte or the trainer's open byte.
_PASS_MASK = 0x0101
_WAIT_VALUE_AND = 0x2  # CU_STREAM_WAIT_VALUE_AND
_REGISTER_PORTABLE_DEVICEMAP = 0x1 | 0x2  # CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP
WATCH_S = 0.005  # the watchdog's period: the resolution of max_wait_s and of the waited-time statistics
ACTIVE_S = 0.5  # a trainer in a step that passed a point this recently (or is held) is training


class DeviceGateError(RuntimeError):
    """The GPU-side gate cannot work here; the caller keeps the host gate."""


@dataclass(frozen=True)
class Observation:
    """What the watchdog saw at one tick."""

    busy: bool  # the server reports requests in flight
    stale: bool  # ... but has not updated the hint for HINT_STALE_S: a writer that died mid-request
    busy_for_s: float  # how long the server has been busy without a break (or since the last forced opening)
    hold_allowed_s: float  # the trainer's credit of holding left (training_share; inf without a floor)


def run_anyway(settings: ServingProtection, seen: Observation) -> str | None:
    """Why the trainer's stream should pass its waits now ("off", "stale", "max_wait", "share"), or None.

    "off": protection, or its GPU-side wait, is turned off (hot): waits already enqueued must pass.

    The host gate's limits, at the watchdog's resolution: a point waits at most `max_wait_s` (here: a server
    busy that long without a break lets one watchdog period of training through, then the count restarts),
    and training keeps `min_training_share` of its time: no hold without credit left.
    """
    if not (settings.yield_when_busy and settings.gpu_wait):
        return "off"
    if not seen.busy:
        return None
    if seen.stale:
        return "stale"
    if seen.busy_for_s >= settings.max_wait_s:
        return "max_wait"
    if settings.min_training_share > 0.0 and seen.hold_allowed_s <= 0.0:
        return "share"
    return None


class HoldPolicy:
    """The watchdog's decisions, pure (times from its clock): at each tick, whether the trainer's byte opens
    (`tick`), and the accounting of the period since the last tick to the token bucket and `stats`."""

    def __init__(self, settings: ServingProtection, stats: GateStats, now: float) -> None:
        self.settings = settings
        self.stats = stats
        self.share = TrainingShare(settings.min_training_share, now)
        self._last_point = -math.inf  # the trainer counts as active for ACTIVE_S after a point
        self._stepping = False  # from a point until `idle`
        self._tick_at = now
        self._was_held = self._was_training = False  # what the last tick decided for the period after it
        self._busy_since: float | None = None

    def update(self, settings: ServingProtection) -> None:
        self.settings = settings
        self.share.set_floor(settings.min_training_share)

    def point(self, now: float) -> None:
        self._last_point = now
        self._stepping = True

    def idle(self) -> None:
        self._stepping = False

    def tick(self, now: float, busy: bool, stale: bool) -> bool:
        """Whether the trainer's byte is open until the next tick."""
        # The period since the last tick, as that tick left the gate.
        elapsed = max(0.0, now - self._tick_at)
        self._tick_at = now
        if self._was_held:
            self.share.held(elapsed, now)
            self.stats.waited_s += elapsed
        elif self._was_training:
            self.share.ran(elapsed, now)
        training = self._stepping and (now - self._last_point < ACTIVE_S or self._was_held)
        if not busy:
            self._busy_since = None
        elif self._busy_since is None:
            self._busy_since = now
            if training:
                self.stats.waits += 1
        seen = Observation(busy, stale, now - (self._busy_since or now), self.share.hold_allowed_s())
        reason = run_anyway(self.settings, seen)
        if reason == "max_wait":
            self.stats.gave_up += 1
            self._busy_since = now
        elif reason == "share" and training:
            self.stats.share_kept += 1
        self._was_held = busy and reason is None and training
        self._was_training = training
        self.stats.training_share = self.share.delivered(now)
        return reason is not None


class _Driver:
    """The four CUDA driver calls this needs, through ctypes. Raises DeviceGateError where unavailable."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as err:
            raise DeviceGateError(f"no CUDA driver library: {err}") from err
        self.wait_value = self._function(lib, ("cuStreamWaitValue32_v2", "cuStreamWaitValue32"))
        self.wait_value.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        self.register = self._function(lib, ("cuMemHostRegister_v2", "cuMemHostRegister"))
        self.register.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        self.unregister = self._function(lib, ("cuMemHostUnregister",))
        self.unregister.argtypes = [ctypes.c_void_p]
        self.device_pointer = self._function(
            lib, ("cuMemHostGetDevicePointer_v2", "cuMemHostGetDevicePointer")
        )
        self.device_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]

    @staticmethod
    def _function(lib: ctypes.CDLL, names: tuple[str, ...]) -> Any:
        for name in names:
            function = getattr(lib, name, None)
            if function is not None:
                function.restype = ctypes.c_int
                return function
        raise DeviceGateError(f"the CUDA driver has none of {', '.join(names)}")

    @staticmethod
    def check(result: int, what: str) -> None:
        if result != 0:
            raise DeviceGateError(f"{what} failed with CUresult {result}")


class _PinnedHint:
    """The hint file mapped writable (for the trainer's byte) and page-locked, with its device address."""

    def __init__(self, driver: _Driver, path: Path) -> None:
        self.driver, self.path = driver, path
        with open(path, "r+b") as f:
            self.inode = os.fstat(f.fileno()).st_ino
            self.map = mmap.mmap(f.fileno(), load_hint.HINT_BYTES)
        version = load_hint.hint_version(self.map[: load_hint.GATE_OFFSET])
        if version is None or version < load_hint.GATE_VERSION:
            self.map.close()
            raise DeviceGateError(f"{path} has no gate word (a server from before hint version 2)")
        self.view = (ctypes.c_char * load_hint.HINT_BYTES).from_buffer(self.map)
        self.host = ctypes.addressof(self.view)
        try:
            driver.check(
                driver.register(self.host, load_hint.HINT_BYTES, _REGISTER_PORTABLE_DEVICEMAP),
                "cuMemHostRegister",
            )
        except DeviceGateError:
            self.close(registered=False)
            raise
        device = ctypes.c_uint64()
        try:
            driver.check(
                driver.device_pointer(ctypes.byref(device), self.host, 0), "cuMemHostGetDevicePointer"
            )
        except DeviceGateError:
            self.close()
            raise
        self.word = device.value + load_hint.GATE_OFFSET

    def hint(self) -> tuple[int, float] | None:
        return load_hint.read_hint(self.map[: load_hint.GATE_OFFSET])

    def set_open(self, value: bool) -> None:
        self.map[load_hint.TRAINER_OPEN_BYTE] = 1 if value else 0

    def close(self, registered: bool = True) -> None:
        """Only after nothing can wait on it any more (the caller opened it and synchronized)."""
        if registered:
            self.driver.unregister(self.host)
        del self.view
        self.map.close()


class DeviceGate:
    """Enqueues the GPU-side waits (`wait_here`) and runs the watchdog that owns the trainer's byte.

    `stats` is the serving gate's: `points` counts the waits enqueued; `waits`, `waited_s`, `gave_up` and
    `share_kept` are what the watchdog saw (busy periods while the trainer was active, the time the gate held
    it, at WATCH_S resolution, and the forced openings).
    """

    def __init__(
        self,
        hint_path: str | os.PathLike[str],
        settings: ServingProtection,
        current_stream: Callable[[], int],
        stats: GateStats,
        stale_s: float = load_hint.HINT_STALE_S,
        bind_context: Callable[[], None] = lambda: None,
    ) -> None:
        """`bind_context` makes the CUDA context current on the watchdog thread, which page-locks the new hint
        file when a restarted server replaces it (a driver call needs a current context)."""
        self.path = Path(hint_path)
        self._bind_context = bind_context
        self.settings = settings
        self.stale_s = stale_s
        self._current_stream = current_stream
        self._driver = _Driver()
        self._hint = _PinnedHint(self._driver, self.path)
        self._retired: list[_PinnedHint] = []  # earlier files (a restarted server): open, kept registered
        self.stats = stats
        self.policy = HoldPolicy(settings, stats, time.monotonic())
        self._failed_inode: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="device-gate", daemon=True)
        self._tick(time.monotonic())  # the trainer's byte is right before the first wait is enqueued
        self._thread.start()

    def wait_here(self) -> None:
        """At a preemption point: the stream's next work waits until the server is idle or the trainer's byte
        lets it through."""
        self.stats.points += 1
        self.policy.point(time.monotonic())
        stream = self._current_stream()
        self._driver.check(
            self._driver.wait_value(stream, self._hint.word, _PASS_MASK, _WAIT_VALUE_AND),
            "cuStreamWaitValue32",
        )

    def update(self, settings: ServingProtection) -> None:
        """Hot change: the watchdog applies it at its next tick (within WATCH_S)."""
        self.settings = settings
        self.policy.update(settings)

    def idle(self) -> None:
        """The trainer finished its step (its last work passed every wait): not training until a point."""
        self.policy.idle()

    def _watch(self) -> None:
        try:
            self._bind_context()
        except Exception:  # then a replaced hint file cannot be followed; _follow_file keeps the old one
            log.exception("device gate watchdog: no CUDA context on its thread")
        while not self._stop.wait(WATCH_S):
            try:
                self._tick(time.monotonic())
            except Exception:  # never leave the trainer's byte closed because the watchdog died
                log.exception("device gate watchdog failed; letting training through")
                self._hint.set_open(True)
                return

    def _tick(self, now: float) -> None:
        self._follow_file()
        hint = self._hint.hint()
        busy = hint is not None and hint[0] > 0
        stale = hint is not None and busy and time.time() - hint[1] >= self.stale_s
        self._hint.set_open(self.policy.tick(now, busy, stale))

    def _follow_file(self) -> None:
        """A restarted server replaces the hint file: open the old word for good and wait on the new one."""
        try:
            inode = os.stat(self.path).st_ino
        except OSError:
            return
        if inode in (self._hint.inode, self._failed_inode):
            return
        try:
            fresh = _PinnedHint(self._driver, self.path)
        except (OSError, ValueError, DeviceGateError) as err:
            if inode != self._failed_inode:  # say it once per file, not every tick
                log.warning("device gate: cannot follow the replaced hint file: %s", err)
                self._failed_inode = inode
            return
        old, self._hint = self._hint, fresh
        old.set_open(True)  # waits enqueued on it pass; it stays registered until close (they may be pending)
        self._retired.append(old)

    def close(self, synchronize: Callable[[], None]) -> None:
        """Let every enqueued wait through, wait for the GPU (`synchronize`), then release the mapping."""
        self._stop.set()
        self._thread.join(timeout=1.0)
        for hint in (self._hint, *self._retired):
            hint.set_open(True)
        synchronize()
        for hint in (self._hint, *self._retired):
            hint.close()


def try_device_gate(
    hint_path: str | os.PathLike[str], settings: ServingProtection, stats: GateStats
) -> DeviceGate | None:
    """A DeviceGate on the current CUDA device's streams; None while it cannot start yet (no CUDA work on
    this thread, no hint file); DeviceGateError where it never will (driver, file system, an old writer)."""
    import torch

    if not (torch.cuda.is_available() and cuda_initialized() and Path(hint_path).exists()):
        return None
    torch.cuda.synchronize()  # the driver calls below need this thread's CUDA context current
    device = torch.cuda.current_device()
    try:
        return DeviceGate(
            hint_path,
            settings,
            lambda: int(torch.cuda.current_stream().cuda_stream),
            stats,
            bind_context=lambda: torch.cuda.set_device(device),
        )
    except (OSError, ValueError) as err:
        raise DeviceGateError(str(err)) from err
