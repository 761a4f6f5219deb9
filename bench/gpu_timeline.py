"""Which training work a slow serving step collided with: the timelines of both processes, joined.

    python bench/gpu_bench.py --part interference --shape 1.5b --candidates worker-default --timeline

Why: under the default protection the 1.5B serving p99 at half load stays ~5 ms above serving alone, and
that residual did not move with chunk size or queue depth (RESULTS.md). A p99 is the few slowest requests,
so the question is what the trainer was doing when those arrived, and where their time went:

- the server records, per request, its arrival, when it launched its step, when the step completed, and the
  step's GPU time between two CUDA events around the graph replay (so `done - launched - gpu` is the time
  the step waited before the GPU ran it, and `gpu` beyond its alone median is time lost while it ran);
- the trainer records every preemption point it passes (`PointRecorder`): when it entered and left, which
  module or piece the point belongs to, and whether it waited there.

`collision_report` joins them (pure; both clocks are CLOCK_MONOTONIC of one machine).
"""

from __future__ import annotations

import statistics
import sys
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from typing import Any

import torch

# One request: (arrival, launched, done, gpu_ms); one point: (entered, left, label).
Request = Sequence[float]
Point = tuple[float, float, str]


class PointRecorder:
    """A preemption point that records itself around `point`: (entered, left, label) while `recording`.

    The label comes from the caller's frame: the module's name for a forward hook of
    `install_preemption_points`, the gradient's shape for its backward hooks, the bucket's shape for APOLLO's
    points, else the calling function's name (the head and clip pieces). Bench-only: a few frame lookups
    per point.
    """

    def __init__(
        self, point: Callable[[], None], module: torch.nn.Module, clock: Callable[[], float]
    ) -> None:
        self.point = point
        self.clock = clock
        self.names = {id(m): name or "model" for name, m in module.named_modules()}
        self.records: list[Point] = []
        self.recording = False
        self._lock = threading.Lock()

    def __call__(self) -> None:
        if not self.recording:
            self.point()
            return
        entered = self.clock()
        self.point()
        left = self.clock()
        with self._lock:
            self.records.append((entered, left, self._label()))

    def _label(self) -> str:
        frame = sys._getframe(2)
        for _ in range(4):
            if frame is None:
                break
            local = frame.f_locals
            if local.get("_module") is not None:  # a forward pre-hook of install_preemption_points
                return f"fwd:{self.names.get(id(local['_module']), type(local['_module']).__name__)}"
            if isinstance(local.get("_grad"), torch.Tensor):  # a backward hook: named by the gradient's shape
                return f"bwd{tuple(local['_grad'].shape)}"
            if local.get("same_shape"):  # APOLLO's point before a bucket
                return f"optim{tuple(local['same_shape'][0].shape)}x{len(local['same_shape'])}"
            if frame.f_code.co_name not in (
                "point",
                "_point",
                "__call__",
                "in_pieces",
                "<listcomp>",
                "<genexpr>",
            ):
                return frame.f_code.co_name
            frame = frame.f_back
        return "?"

    def clear(self) -> None:
        with self._lock:
            self.records = []

    def take(self, begin: float, end: float) -> list[Point]:
        with self._lock:
            inside = [r for r in self.records if begin <= r[0] <= end]
            self.records = []
        return inside


def _around(
    points: list[Point], entered: list[float], t: float, before_s: float, after_s: float
) -> list[Point]:
    return points[bisect_left(entered, t - before_s) : bisect_right(entered, t + after_s)]


def collision_report(
    requests: Sequence[Request], points: Sequence[Point], *, slowest: int = 8, window_ms: float = 4.0
) -> dict[str, Any]:
    """The slowest requests with their time split, and the trainer's points around each arrival.

    Per request: `latency_ms` (arrival -> done), `late_ms` (arrival -> launch: queueing behind the previous
    request, or the server's own host lateness), `before_gpu_ms` (launch -> done minus GPU time: the wait
    for the GPU), `gpu_extra_ms` (its GPU time over the window's median), and `trainer` (points from
    `window_ms` before the launch to the completion: ms relative to the launch, label, ms spent in the point).
    `last_labels` counts, over the slow and over all requests, which point the trainer passed last before
    each launch: the piece that was running when the request came.
    """
    if not requests:
        return {"requests": 0}
    ordered = sorted(points)
    entered = [p[0] for p in ordered]
    gpu_median = statistics.median(r[3] for r in requests)
    by_latency = sorted(requests, key=lambda r: r[2] - r[0], reverse=True)

    def last_label(launched: float) -> str:
        i = bisect_right(entered, launched)
        return ordered[i - 1][2] if i else "-"

    def count(rows: Sequence[Request]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in rows:
            label = last_label(row[1])
            counts[label] = counts.get(label, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:12])

    slow = []
    for arrival, launched, done, gpu_ms in by_latency[:slowest]:
        nearby = _around(ordered, entered, launched, window_ms / 1e3, done - launched)
        slow.append({
            "latency_ms": 1e3 * (done - arrival),
            "late_ms": 1e3 * (launched - arrival),
            "before_gpu_ms": 1e3 * (done - launched) - gpu_ms,
            "gpu_ms": gpu_ms,
            "gpu_extra_ms": gpu_ms - gpu_median,
            "trainer": [(round(1e3 * (p[0] - launched), 2), p[2], round(1e3 * (p[1] - p[0]), 2)) for p in nearby],
        })  # fmt: skip
    return {
        "requests": len(requests),
        "points": len(ordered),
        "gpu_median_ms": gpu_median,
        "slow": slow,
        "last_labels_slow": count(by_latency[: max(slowest, len(requests) // 50)]),
        "last_labels_all": count(requests),
    }
