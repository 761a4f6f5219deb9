"""The GPU's SM clock, power draw and power limit, read through NVML (libnvidia-ml via ctypes; no pynvml).

Why the worker exports them: on a card at its power limit, training at full speed pulls the clock down
whenever the GPU never rests, and serving's steps then run slower however strictly the trainer yields. On an
H100 at 7B the clock fell from 1920 to 1650-1695 MHz at 700 W and serving's step went from 57.7 to 62.0 ms
(bench/RESULTS.md). The interference dashboard shows these beside serving's latency, so that cost can be told
apart from the trainer's own collisions with serving.

Read-only: nothing here sets a clock or a limit. `open_device` returns None (and the gauges stay absent) where
there is no NVML library, no such GPU, or any NVML call fails.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

LIBRARY = "libnvidia-ml.so.1"
NVML_SUCCESS = 0
NVML_CLOCK_SM = 1
# nvmlClocksEventReasons bits (nvml.h): what holds the clock below its maximum.
SW_POWER_CAP = 0x4
HW_SLOWDOWN = 0x8
SW_THERMAL = 0x20
HW_THERMAL = 0x40
HW_POWER_BRAKE = 0x80
POWER_REASONS = SW_POWER_CAP | HW_POWER_BRAKE
THERMAL_REASONS = SW_THERMAL | HW_THERMAL | HW_SLOWDOWN


@dataclass(frozen=True)
class GpuReading:
    sm_clock_hz: float
    power_watts: float
    power_limit_watts: float
    reasons: int  # nvmlClocksEventReasons bits

    @classmethod
    def from_nvml(cls, sm_mhz: int, power_mw: int, limit_mw: int, reasons: int) -> GpuReading:
        """NVML's units (MHz, milliwatts) to the exported ones (hertz, watts)."""
        return cls(sm_mhz * 1e6, power_mw / 1e3, limit_mw / 1e3, reasons)

    @property
    def power_capped(self) -> bool:
        """The clock is held down by the power limit (software cap or hardware brake)."""
        return bool(self.reasons & POWER_REASONS)

    @property
    def thermal_limited(self) -> bool:
        return bool(self.reasons & THERMAL_REASONS)


def nvml_uuid(device: Any) -> str:
    """NVML's name of a torch CUDA device: "GPU-" and the device's UUID (what torch reports, without it).

    By UUID, not index: CUDA_VISIBLE_DEVICES renumbers CUDA's devices, NVML's indexes stay the host's."""
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    return f"GPU-{props.uuid}"


class Nvml:
    """One GPU's readings; `read()` is what the worker's /metrics calls at scrape time."""

    def __init__(self, library: Any, handle: ctypes.c_void_p) -> None:
        self._lib = library
        self._handle = handle

    @classmethod
    def open(cls, uuid: str, library: str = LIBRARY) -> Nvml | None:
        try:
            lib = ctypes.CDLL(library)
        except OSError as err:
            log.info("no NVML: GPU clock and power not exported", extra={"error": str(err)})
            return None
        handle = ctypes.c_void_p()
        for call, args in (
            ("nvmlInit_v2", ()),
            ("nvmlDeviceGetHandleByUUID", (uuid.encode(), ctypes.byref(handle))),
        ):
            code = getattr(lib, call)(*args)
            if code != NVML_SUCCESS:
                log.warning("NVML %s failed (%s): GPU clock and power not exported", call, code)
                return None
        nvml = cls(lib, handle)
        return nvml if nvml.read() is not None else None

    @property
    def _reasons_call(self) -> Any:
        # The name since driver 535; the older one is kept by NVML as an alias, and is all an older driver has.
        try:
            return self._lib.nvmlDeviceGetCurrentClocksEventReasons
        except AttributeError:
            return self._lib.nvmlDeviceGetCurrentClocksThrottleReasons

    def read(self) -> GpuReading | None:
        """The current reading, or None where any call fails (a reset GPU, a driver going away)."""
        sm_mhz, power_mw, limit_mw = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint()
        reasons = ctypes.c_ulonglong()
        lib, handle = self._lib, self._handle
        codes = (
            lib.nvmlDeviceGetClockInfo(handle, NVML_CLOCK_SM, ctypes.byref(sm_mhz)),
            lib.nvmlDeviceGetPowerUsage(handle, ctypes.byref(power_mw)),
            lib.nvmlDeviceGetEnforcedPowerLimit(handle, ctypes.byref(limit_mw)),
            self._reasons_call(handle, ctypes.byref(reasons)),
        )
        if any(code != NVML_SUCCESS for code in codes):
            return None
        return GpuReading.from_nvml(sm_mhz.value, power_mw.value, limit_mw.value, reasons.value)


def open_device(device: Any) -> Nvml | None:
    """NVML for the worker's CUDA device, or None (a CPU device, no NVML, or it does not know the GPU)."""
    if not str(device).startswith("cuda"):
        return None
    try:
        uuid = nvml_uuid(device)
    except (RuntimeError, AssertionError, ValueError) as err:  # no CUDA here
        log.info("no CUDA device: GPU clock and power not exported", extra={"error": str(err)})
        return None
    return Nvml.open(uuid)


class OnDemand:
    """`open_device` at the first `read()` for which `ready()` holds, and only that once.

    Why not at the worker's start: finding the GPU initializes CUDA in the worker, which must not happen
    before vLLM's MPS daemon (when one is asked for) is up, or the worker would not be its client. Once the
    worker has mapped vLLM's weights, CUDA is initialized anyway. A machine without NVML is not asked again
    at every scrape."""

    def __init__(self, device: Any, ready: Callable[[], bool]) -> None:
        self.device, self.ready = device, ready
        self.nvml: Nvml | None = None
        self.tried = False

    def read(self) -> GpuReading | None:
        if not self.tried and self.ready():
            self.tried = True
            self.nvml = open_device(self.device)
        return self.nvml.read() if self.nvml is not None else None
