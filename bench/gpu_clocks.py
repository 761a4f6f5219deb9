"""The card's SM clock and power over the bench's windows, sampled with `nvidia-smi` (read-only queries).

Why: at 7B the serving step takes ~58 ms when the GPU idles between requests and ~62.7 ms back to back
(saturated, no trainer at all), and the same ~62.7 ms beside a trainer that yields strictly. If that is the
clock falling under the power limit once the GPU never rests, a strict yield cannot give the trainer more than
1 - (serving's busy time at the lower clock) of the wall time, however it is scheduled. These samples let each
window say what clock and power it ran at, and whether the driver reported the power cap.

The clocks are only read here, never set: the GPU is shared, and its settings are not the bench's to change.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

# nvidia-smi's `clocks_event_reasons.active` bits (nvml's clocksEventReasons): what held the clock down.
REASON_BITS = {
    "idle": 0x1,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
}
FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "clocks_event_reasons.active")


@dataclass(frozen=True)
class Sample:
    at_s: float  # the bench's shared clock (gpu_common.now_s) when the line arrived
    sm_mhz: float
    mem_mhz: float
    power_w: float
    temperature_c: float
    reasons: int


def parse_line(line: str, at_s: float) -> Sample | None:
    """One `--format=csv,noheader,nounits` line of FIELDS; None for anything else (a header, "[N/A]", an
    error line), so one odd line never ends the sampling."""
    parts = [part.strip() for part in line.split(",")]
    if len(parts) != len(FIELDS):
        return None
    try:
        sm, mem, power, temperature = (float(part) for part in parts[:4])
        reasons = int(parts[4], 16)
    except ValueError:
        return None
    return Sample(at_s, sm, mem, power, temperature, reasons)


def summarize(samples: Sequence[Sample], begin: float, end: float) -> dict[str, Any]:
    """Medians over the samples in [begin, end], and the share of them with each limiting reason set."""
    inside = [s for s in samples if begin <= s.at_s <= end]
    if not inside:
        return {"samples": 0}
    summary: dict[str, Any] = {
        "samples": len(inside),
        "sm_mhz_median": statistics.median(s.sm_mhz for s in inside),
        "sm_mhz_min": min(s.sm_mhz for s in inside),
        "mem_mhz_median": statistics.median(s.mem_mhz for s in inside),
        "power_w_median": statistics.median(s.power_w for s in inside),
        "power_w_max": max(s.power_w for s in inside),
        "temperature_c_max": max(s.temperature_c for s in inside),
    }
    for name, bit in REASON_BITS.items():
        summary[f"{name}_share"] = sum(1 for s in inside if s.reasons & bit) / len(inside)
    return summary


class ClockSampler:
    """`nvidia-smi --loop-ms=PERIOD` in the background; each line is stamped on arrival with `clock`.

    Absent `nvidia-smi` (or a query the driver refuses), `available` is False and every window summarizes to
    `{"samples": 0}`: the bench's figures never depend on it."""

    def __init__(self, clock: Callable[[], float], period_ms: int = 50) -> None:
        self.clock = clock
        self.samples: list[Sample] = []
        self.refused: list[str] = []
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        binary = shutil.which("nvidia-smi")
        if binary is None:
            return
        self._process = subprocess.Popen(
            [
                binary,
                f"--query-gpu={','.join(FIELDS)}",
                "--format=csv,noheader,nounits",
                f"--loop-ms={period_ms}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self._process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self._process.stdout,), daemon=True)
        self._reader.start()

    @property
    def available(self) -> bool:
        with self._lock:
            return bool(self.samples)

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            sample = parse_line(line, self.clock())
            with self._lock:
                if sample is not None:
                    self.samples.append(sample)
                elif len(self.refused) < 5:
                    self.refused.append(line.strip())

    def window(self, begin: float, end: float) -> dict[str, Any]:
        with self._lock:
            samples = list(self.samples)
        summary = summarize(samples, begin, end)
        if not samples and self.refused:
            summary["refused"] = self.refused[:2]
        return summary

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
