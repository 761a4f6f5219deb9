"""When local mode restarts a crashed worker: exponential backoff, and a limit on restarts within a window.

vLLM owns the served weights and keeps serving while the worker is down; a restarted worker maps them again
and restores the newest optimizer state. A worker that keeps crashing is a bug to look at, not to hide: past
the limit, local mode stops. Pure: times go in, a delay (or None: give up) comes out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # within window_s; the next crash ends local mode
    window_s: float = 600.0
    base_delay_s: float = 1.0  # doubles with every restart still in the window
    max_delay_s: float = 30.0

    def next_delay(self, restarts: Sequence[float], now: float) -> float | None:
        """Seconds to wait before the next restart, given when earlier ones happened; None: give up."""
        recent = sum(1 for t in restarts if now - t < self.window_s)
        if recent >= self.max_restarts:
            return None
        return min(self.max_delay_s, self.base_delay_s * 2.0**recent)
