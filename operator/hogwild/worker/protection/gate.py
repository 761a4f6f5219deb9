"""The serving gate: at each preemption point, hold training while the server is busy, within its limits.

At a point (`ServingGate.point`) the trainer waits while the server reports requests in flight (`probes`), up to
`max_wait_s` per point, and only while its token bucket has credit (`share`: training keeps
`min_training_share` of its own time). Where it can (`settings.gpu_wait`, a hint file, CUDA), it waits in the
GPU: the point enqueues a stream wait on the hint's gate word (`device`) and the host goes on launching.
Otherwise it waits here on the host: first until at most ~QUEUE_BUDGET_S of its work is left queued on the GPU
(`ChunkQueue`), then it launches nothing while the server is busy. The time between steps (`idle`) counts as
neither training nor held.

Measured on an H100 (bench/RESULTS.md), half-capacity load: waiting in the GPU, serving p99 rose 1.06-1.09x at
1.5B and 1.13-1.14x at 7B while training kept 0.57-0.62 and 0.49-0.50 of its idle-server speed; waiting on the
host, 1.11-1.12x and 1.17-1.19x, kept 0.42-0.50 and 0.49-0.51. Layer-level points alone gave about 2x, a 50 %
duty cycle 7x, and no protection let the serving queue grow without bound.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hogwild.config import ServingProtection
from hogwild.typed_calls import cuda_initialized, cuda_timing_event
from hogwild.worker.protection.probes import LoadProbe, close_probe
from hogwild.worker.protection.share import TrainingShare

log = logging.getLogger("hogwild.worker")

POLL_S = 0.0002
# GPU time of training work the gate lets be queued at a point (ChunkQueue): what a serving step that
# arrives then may have to wait behind. From 1 to MAX_DEPTH chunks.
QUEUE_BUDGET_S = 0.002
MAX_DEPTH = 4
# Time between two points longer than this is not training (a pause the trainer's caller took, not a chunk).
IDLE_GAP_S = 1.0
# How often a gate without its GPU-side wait tries again to set one up (the hint file may not exist yet).
DEVICE_RETRY_S = 10.0


@dataclass
class GateStats:
    points: int = 0
    waits: int = 0
    waited_s: float = 0.0
    gave_up: int = 0  # waits that ended at max_wait_s with the server still busy
    share_kept: int = 0  # waits limited (or skipped) to keep min_training_share of the time for training
    training_share: float = 1.0  # the share of its recent time the trainer kept (ran / (ran + held))
    training_share_floor: float = 0.0  # min_training_share while protection is on, else 0
    gpu_wait_error: str = ""  # why the GPU-side wait could not start or stopped ("" while it never failed)


class StreamGate(Protocol):
    """What the gate needs of its GPU-side wait (`device.DeviceGate`)."""

    def wait_here(self) -> None: ...

    def update(self, settings: ServingProtection) -> None: ...

    def idle(self) -> None: ...

    def close(self, synchronize: Callable[[], None]) -> None: ...


class ChunkQueue:
    """The training chunks launched but maybe not yet run on the GPU, bounded by their measured GPU time.

    At each point `mark` ends the chunk launched since the previous point with an event, then waits for the
    oldest chunks until at most `depth() - 1` are unfinished, so the one launched next makes `depth()`. The
    depth is QUEUE_BUDGET_S over the chunks' recent GPU time (an average of the time between the events of
    consecutive points), from 1 to MAX_DEPTH; `fixed_depth` overrides it.

    Why not a fixed count: two chunks in flight was ~0.3 ms of queued work at 1.5B but ~3 ms at 7B (one
    backward projection is ~1.5 ms there), and a serving step that arrived behind them lost about twice that
    to time-slicing (bench --timeline). Where chunks are short, a deeper queue keeps the GPU fed while the
    host reaches the next point.
    """

    def __init__(
        self,
        budget_s: float = QUEUE_BUDGET_S,
        fixed_depth: int | None = None,
        new_event: Callable[[], Any] = cuda_timing_event,
    ) -> None:
        self.budget_s = budget_s
        self.fixed_depth = fixed_depth
        self.chunk_s = 0.0  # recent GPU time of a chunk; 0 until measured
        self._new_event = new_event
        self._pending: deque[tuple[Any, bool]] = deque()  # (event, the chunk before it began after a wait)
        self._last_done: Any = None
        self._after_wait = False

    def depth(self) -> int:
        if self.fixed_depth is not None:
            return max(1, self.fixed_depth)
        if self.chunk_s <= 0.0:
            return 2
        return max(1, min(MAX_DEPTH, int(self.budget_s / self.chunk_s)))

    def waited(self) -> None:
        """The point waited after `mark`: the next chunk's event-to-event time would hold the wait."""
        self._after_wait = True

    def mark(self) -> None:
        event = self._new_event()
        event.record()
        self._pending.append((event, self._after_wait))
        self._after_wait = False
        while len(self._pending) > self.depth() - 1:
            done, after_wait = self._pending.popleft()
            done.synchronize()
            if self._last_done is not None and not after_wait:
                # Capped: a gap between steps (host work, a sync) is not a chunk's length.
                sample = min(self._last_done.elapsed_time(done) / 1e3, 4 * self.budget_s)
                self.chunk_s = sample if self.chunk_s == 0.0 else 0.8 * self.chunk_s + 0.2 * sample
            self._last_done = done


class ServingGate:
    """Preemption points for the training step; see the module docstring."""

    def __init__(
        self,
        probe: LoadProbe | None,
        settings: ServingProtection | None = None,
        queue: ChunkQueue | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        device_factory: Callable[[], StreamGate | None] | None = None,
    ) -> None:
        self.probe = probe
        self.settings = settings or ServingProtection()
        self.queue = queue or ChunkQueue()
        self.stats = GateStats()
        self._set_floor(self.settings)
        # Where set (`use_device`, or made by `device_factory` on a point while settings.gpu_wait), points wait
        # in the GPU stream instead (`device`). The factory returns None while it cannot
        # start yet (tried again after DEVICE_RETRY_S) and raises where it never can (then the host it is).
        self.device: StreamGate | None = None
        self.device_factory = device_factory
        self._device_retry_at = 0.0
        self._clock, self._sleep = clock, sleep
        self.share = TrainingShare(self.settings.min_training_share, clock())  # on the host path
        self._last: float | None = None  # when the trainer left its last point; None between steps

    def update(self, settings: ServingProtection) -> None:
        """Hot change: the next point uses the new settings."""
        self.settings = settings
        self.share.set_floor(settings.min_training_share)
        self._set_floor(settings)
        if self.device is not None:
            self.device.update(settings)

    def _set_floor(self, settings: ServingProtection) -> None:
        self.stats.training_share_floor = settings.min_training_share if settings.yield_when_busy else 0.0

    def idle(self) -> None:
        """The trainer finished a step: the time until its next point is not training (nor held)."""
        self._ran_until(self._clock())
        self._last = None
        if self.device is not None:
            self.device.idle()

    def _ran_until(self, now: float) -> None:
        if self._last is not None and now - self._last <= IDLE_GAP_S:
            self.share.ran(now - self._last, now)
        self.stats.training_share = self.share.delivered(now)

    def _start_device(self) -> StreamGate | None:
        if self.device_factory is None or self._clock() < self._device_retry_at:
            return None
        self._device_retry_at = self._clock() + DEVICE_RETRY_S
        try:
            device = self.device_factory()
        except Exception as err:  # the driver, the file or the writer cannot support it: keep the host gate
            log.warning("serving protection waits on the host: the GPU-side wait cannot start (%s)", err)
            self.stats.gpu_wait_error = f"cannot start: {err}"
            self.device_factory = None
            return None
        if device is not None:
            log.info("serving protection waits in the GPU stream", extra={"event": "device_gate"})
            self.use_device(device)
        return device

    def close(self) -> None:
        """At shutdown: release the GPU-side gate (`close_device`) and the probe."""
        self.close_device()
        close_probe(self.probe)

    def close_device(self) -> None:
        """Let any wait enqueued in the GPU through and release the GPU-side gate; on the host from here."""
        if self.device is not None:
            self.device.close(torch.cuda.synchronize if torch.cuda.is_available() else lambda: None)
            self.device = None

    def use_device(self, device: StreamGate | None) -> None:
        """Wait in the GPU stream from the next point on (None: on the host again)."""
        self.device = device
        if device is not None:
            device.update(self.settings)

    def busy(self) -> bool:
        return self.probe is not None and self.probe.busy()

    def point(self) -> None:
        if not self.settings.yield_when_busy or self.probe is None:
            return
        if self.settings.gpu_wait:
            device = self.device or self._start_device()
            if device is not None:
                try:
                    device.wait_here()
                    return
                except Exception as err:  # a driver error mid-run: on the host from here on, never stuck
                    log.warning(
                        "serving protection goes back to the host: the GPU-side wait failed (%s)", err
                    )
                    self.stats.gpu_wait_error = f"failed: {err}"
                    self.device_factory = None
                    self.close_device()
        self.stats.points += 1
        if torch.cuda.is_available() and cuda_initialized():
            self.queue.mark()
        started = self._clock()
        self._ran_until(started)  # since the last point: a chunk of training
        self._last = started
        if not self.probe.busy():
            return
        allowed = min(self.settings.max_wait_s, self.share.hold_allowed_s())
        if allowed < self.settings.max_wait_s:
            self.stats.share_kept += 1
            if allowed <= 0.0:
                return
        deadline = started + allowed
        while self.probe.busy():
            if self._clock() >= deadline:
                if allowed >= self.settings.max_wait_s:  # else the share cut it short (counted above)
                    self.stats.gave_up += 1
                break
            self._sleep(POLL_S)
        ended = self._clock()
        self.share.held(ended - started, ended)
        self.stats.training_share = self.share.delivered(ended)
        self._last = ended
        self.queue.waited()
        self.stats.waits += 1
        self.stats.waited_s += ended - started
