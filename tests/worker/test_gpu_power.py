"""The GPU's clock and power through NVML (`hogwild.worker.gpu_power`) and their gauges on the worker's /metrics.

On this CPU machine there is no NVML: the unit conversions and flags are pure, the missing-library and no-CUDA
paths are real, and `Nvml.read`'s ctypes calls run against a stand-in library object (Python functions that
write through the same `byref` pointers NVML would; a mock, because no real NVML can run here). The GPU test at
the end reads the real NVML of the card the worker trains on.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hogwild.worker import gpu_power
from hogwild.worker.gpu_power import GpuReading, Nvml
from hogwild.worker.metrics import WorkerMetrics


def gpu_gauges(metrics: WorkerMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    families = text_string_to_metric_families(text)
    return {s.name: s.value for f in families for s in f.samples if s.name.startswith("hogwild_worker_gpu_")}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ((1980, 312_070, 700_000, 0x0), (1.98e9, 312.07, 700.0, False, False)),
        ((1650, 692_280, 700_000, gpu_power.SW_POWER_CAP), (1.65e9, 692.28, 700.0, True, False)),
        ((1410, 650_000, 700_000, gpu_power.HW_POWER_BRAKE), (1.41e9, 650.0, 700.0, True, False)),
        ((1200, 500_000, 700_000, gpu_power.SW_THERMAL), (1.2e9, 500.0, 700.0, False, True)),
        ((345, 76_930, 700_000, 0x1), (3.45e8, 76.93, 700.0, False, False)),  # idle: not a limit
    ],
)
def test_nvml_units_become_the_exported_ones(
    raw: tuple[int, int, int, int], expected: tuple[Any, ...]
) -> None:
    reading = GpuReading.from_nvml(*raw)
    got = (reading.sm_clock_hz, reading.power_watts, reading.power_limit_watts)
    assert got == pytest.approx(expected[:3])
    assert (reading.power_capped, reading.thermal_limited) == expected[3:]


class StandInNvml:
    """NVML's six calls as Python functions writing through ctypes `byref` pointers (`._obj`); `fail` names a
    call that returns an NVML error instead."""

    def __init__(self, fail: str = "", event_reasons: bool = True) -> None:
        self.fail = fail
        self.values = {
            "nvmlDeviceGetClockInfo": 1755,
            "nvmlDeviceGetPowerUsage": 689_870,
            "nvmlDeviceGetEnforcedPowerLimit": 700_000,
        }
        # Drivers since 535 have the new name of the reasons call; an older one only the old name.
        name = "EventReasons" if event_reasons else "ThrottleReasons"
        setattr(self, f"nvmlDeviceGetCurrentClocks{name}", self._reasons)

    def _result(self, name: str, out: Any, value: int) -> int:
        if name == self.fail:
            return 999  # NVML_ERROR_UNKNOWN
        out._obj.value = value
        return gpu_power.NVML_SUCCESS

    def nvmlInit_v2(self) -> int:
        return 999 if self.fail == "nvmlInit_v2" else gpu_power.NVML_SUCCESS

    def nvmlDeviceGetHandleByUUID(self, uuid: bytes, out: Any) -> int:
        return self._result("nvmlDeviceGetHandleByUUID", out, 0x1234) if uuid.startswith(b"GPU-") else 13

    def nvmlDeviceGetClockInfo(self, handle: Any, clock: int, out: Any) -> int:
        assert clock == gpu_power.NVML_CLOCK_SM
        return self._result("nvmlDeviceGetClockInfo", out, self.values["nvmlDeviceGetClockInfo"])

    def nvmlDeviceGetPowerUsage(self, handle: Any, out: Any) -> int:
        return self._result("nvmlDeviceGetPowerUsage", out, self.values["nvmlDeviceGetPowerUsage"])

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any, out: Any) -> int:
        return self._result(
            "nvmlDeviceGetEnforcedPowerLimit", out, self.values["nvmlDeviceGetEnforcedPowerLimit"]
        )

    def _reasons(self, handle: Any, out: Any) -> int:
        return self._result("reasons", out, gpu_power.SW_POWER_CAP)


def _open_with(monkeypatch: pytest.MonkeyPatch, lib: StandInNvml, uuid: str = "GPU-0000") -> Nvml | None:
    monkeypatch.setattr(gpu_power.ctypes, "CDLL", lambda _name: lib)
    return Nvml.open(uuid)


@pytest.mark.parametrize("event_reasons", [True, False], ids=["driver >= 535", "older driver"])
def test_a_reading_goes_through_nvml_s_pointers(monkeypatch: pytest.MonkeyPatch, event_reasons: bool) -> None:
    nvml = _open_with(monkeypatch, StandInNvml(event_reasons=event_reasons))
    assert nvml is not None
    assert nvml.read() == GpuReading(1.755e9, 689.87, 700.0, gpu_power.SW_POWER_CAP)


@pytest.mark.parametrize(
    ("fail", "uuid"),
    [
        ("nvmlInit_v2", "GPU-0000"),
        ("nvmlDeviceGetHandleByUUID", "GPU-0000"),
        ("", "MIG-0000"),  # a name NVML does not know
        ("nvmlDeviceGetPowerUsage", "GPU-0000"),  # opens, but the first reading fails
    ],
)
def test_any_failing_call_leaves_the_gauges_out(
    monkeypatch: pytest.MonkeyPatch, fail: str, uuid: str
) -> None:
    assert _open_with(monkeypatch, StandInNvml(fail=fail), uuid) is None


def test_a_reading_that_fails_later_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = StandInNvml()
    nvml = _open_with(monkeypatch, lib)
    assert nvml is not None and nvml.read() is not None
    lib.fail = "nvmlDeviceGetClockInfo"  # e.g. the GPU fell off the bus
    assert nvml.read() is None


def test_without_the_library_there_is_no_reader() -> None:
    assert Nvml.open("GPU-0000", library="libnvidia-ml-not-here.so.1") is None


@pytest.mark.parametrize("device", ["cpu", "cuda"] if not torch.cuda.is_available() else ["cpu"])
def test_a_device_without_cuda_has_no_reader(device: str) -> None:
    assert gpu_power.open_device(device) is None


@pytest.mark.parametrize(
    ("ready_at", "opens", "readings"),
    [
        # Not mapped for two scrapes: NVML is not opened (it would initialize CUDA); then once, for good.
        pytest.param([False, False, True, True, True], 1, [None, None, "r", "r", "r"], id="after mapping"),
        pytest.param([True, True, True], 1, ["r", "r", "r"], id="mapped at once"),
        pytest.param([False, False, False], 0, [None, None, None], id="never mapped"),
    ],
)
def test_nvml_is_opened_once_the_weights_are_mapped(
    monkeypatch: pytest.MonkeyPatch, ready_at: list[bool], opens: int, readings: list[str | None]
) -> None:
    reading = GpuReading.from_nvml(1980, 300_000, 700_000, 0)
    opened: list[str] = []

    class Reader:
        def read(self) -> GpuReading:
            return reading

    def open_device(device: str) -> Reader:
        opened.append(device)
        return Reader()

    monkeypatch.setattr(gpu_power, "open_device", open_device)
    states = iter(ready_at)
    on_demand = gpu_power.OnDemand("cuda:0", lambda: next(states))
    got = [on_demand.read() for _ in ready_at]
    assert opened == ["cuda:0"] * opens
    assert got == [reading if r == "r" else None for r in readings]


def test_a_machine_without_nvml_is_asked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(gpu_power, "open_device", lambda device: calls.append(device))  # returns None
    on_demand = gpu_power.OnDemand("cuda", lambda: True)
    assert [on_demand.read() for _ in range(3)] == [None, None, None]
    assert calls == ["cuda"]


GAUGES = {
    "hogwild_worker_gpu_sm_clock_hertz": 1.65e9,
    "hogwild_worker_gpu_power_watts": 692.28,
    "hogwild_worker_gpu_power_limit_watts": 700.0,
    "hogwild_worker_gpu_power_capped": 1.0,
    "hogwild_worker_gpu_thermal_limited": 0.0,
}


@pytest.mark.parametrize(
    ("reading", "expected"),
    [
        pytest.param(GpuReading.from_nvml(1650, 692_280, 700_000, gpu_power.SW_POWER_CAP), GAUGES, id="read"),
        pytest.param(None, {}, id="a failed reading: no stale values"),
    ],
)
def test_the_worker_exports_the_reading_at_scrape_time(reading: GpuReading | None, expected: dict) -> None:
    metrics = WorkerMetrics()
    assert gpu_gauges(metrics) == {}  # no reader attached: a CPU worker, or no NVML
    metrics.watch_gpu(lambda: reading)
    assert gpu_gauges(metrics) == pytest.approx(expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_real_nvml_reads_the_training_gpu() -> None:
    nvml = gpu_power.open_device("cuda")
    assert nvml is not None, "NVML should open on a machine whose nvidia-smi works"
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(50):  # a second or so of load, so that the clock is not the idle one
        x = (x @ x).clamp_(-1, 1)
    reading = nvml.read()
    torch.cuda.synchronize()
    assert reading is not None
    assert 2e8 < reading.sm_clock_hz < 3.5e9
    assert 20.0 < reading.power_watts < 1.5 * reading.power_limit_watts
    assert 100.0 <= reading.power_limit_watts <= 1500.0
