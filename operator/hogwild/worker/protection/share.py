"""Training's guaranteed share of time beside a server that never idles: a token bucket, pure.

Why a bucket: under continuous batching a real vLLM has a request in flight almost all the time, so a gate
that holds training while any is in flight leaves it only what its limits force open. The earlier limit was
a trailing fraction of *wall* time spent waiting, and it missed in both gates: on the host, the gaps between
steps (the reply, the next request, a prefix-cache reset) counted as training, so the trainer waited 1 - share
of a wall time it mostly did not train in; in the GPU, the watchdog counted a hold only while the trainer had
passed a point in the last half second, but a trainer held in the GPU soon blocks on a host sync and passes
none, so the holds stopped counting and the share never opened the gate (on an H200 beside real vLLM the
trainer kept 0.026 and 0.17-0.20 of its speed with `min_training_share` 0.1; the only openings were
`max_wait_s`'s, about one a second).

Here only the trainer's own time counts: `ran` (it computed, or its stream was open) and `held` (it was held
for serving). Each second it runs earns (1 - share) / share seconds of credit to be held, and each second
held spends one; the gate holds only while credit is left. So, whatever the load, held <= ran x (1 - share) /
share + the bucket's size, i.e. training keeps at least `share` of the time it wants to train. The bucket
holds at most (1 - share) x WINDOW_S, and starts full: after training beside an idle server, a burst of serving
of up to that long is fully protected; a server busy for longer gets the share from then on, in slices as
fine as the chunks between preemption points (~1 ms of training, then ~9 ms held at the default 0.1).

`delivered` is the share actually kept, ran / (ran + held) over the last ~WINDOW_S of the trainer's time
(both decayed with that time constant): the `hogwild_worker_training_share` gauge.

What the floor is not: a share of the device's speed. When it runs beside serving, training shares the GPU
(time slices) or the CPU cores with it, so what it trains in its share of time is less than the same time
alone; bench/RESULTS.md has the ratio measured on CPU.
"""

from __future__ import annotations

import math

# The bucket's size is (1 - share) x WINDOW_S of holding, and the delivered share's time constant.
WINDOW_S = 5.0


class TrainingShare:
    """The token bucket and the delivered share; times in seconds, `now` from any monotonic clock."""

    def __init__(self, floor: float, now: float, window_s: float = WINDOW_S) -> None:
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"the training share must be within [0, 1], got {floor}")
        self.window_s = window_s
        self.floor = floor
        self.credit_s = self.capacity_s
        self._ran = 0.0
        self._held = 0.0
        self._at = now

    @property
    def capacity_s(self) -> float:
        return (1.0 - self.floor) * self.window_s

    def set_floor(self, floor: float) -> None:
        """Hot change: the credit is clipped to the new bucket (a higher floor holds less from now on)."""
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"the training share must be within [0, 1], got {floor}")
        self.floor = floor
        self.credit_s = min(self.credit_s, self.capacity_s)

    def hold_allowed_s(self) -> float:
        """How much longer the trainer may be held now: the credit, inf without a floor, 0 at a floor of 1."""
        if self.floor <= 0.0:
            return math.inf
        return max(0.0, self.credit_s)

    def ran(self, seconds: float, now: float) -> None:
        """The trainer computed (or was free to) for `seconds`, ending at `now`."""
        seconds = max(0.0, seconds)
        self._decay(now)
        self._ran += seconds
        if self.floor > 0.0:
            earned = seconds * (1.0 - self.floor) / self.floor
            self.credit_s = min(self.capacity_s, self.credit_s + earned)

    def held(self, seconds: float, now: float) -> None:
        """The trainer was held for serving for `seconds`, ending at `now`."""
        seconds = max(0.0, seconds)
        self._decay(now)
        self._held += seconds
        self.credit_s -= seconds  # may go below 0 by a hold's overshoot; then it runs that much longer

    def delivered(self, now: float) -> float:
        """The trainer's share of its own recent time, ran / (ran + held); 1 while it was never held."""
        self._decay(now)
        total = self._ran + self._held
        return 1.0 if total <= 0.0 else self._ran / total

    def _decay(self, now: float) -> None:
        elapsed = max(0.0, now - self._at)
        keep = math.exp(-elapsed / self.window_s)
        self._ran *= keep
        self._held *= keep
        self._at = max(self._at, now)
