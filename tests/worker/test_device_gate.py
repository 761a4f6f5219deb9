"""Serving protection in the GPU stream (worker/protection/device.py) and the hint file's gate word it waits on.

The decision and the hint's bytes are pure and run here. The GPU tests run the real driver calls
(cuMemHostRegister on the hint file's page, cuStreamWaitValue32) on the GPU machine: a kernel enqueued after a
point must not run while the server's byte says busy, and must run once it says idle or the watchdog opens
the trainer's byte.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hogwild import load_hint
from hogwild.config import ServingProtection
from hogwild.load_hint import LoadHint, read_hint
from hogwild.worker.protection.device import Observation, run_anyway
from hogwild.worker.protection.probes import HintFileProbe

DEFAULT = ServingProtection()


@pytest.mark.parametrize(
    ("settings", "seen", "reason"),
    [
        pytest.param(DEFAULT, Observation(False, False, 0.0, 0.0), None, id="idle-server"),
        pytest.param(DEFAULT, Observation(True, False, 0.01, 0.5), None, id="busy-server-holds-with-credit"),
        pytest.param(
            ServingProtection(yield_when_busy=False), Observation(True, False, 0.0, 0.0), "off", id="off"
        ),
        pytest.param(
            ServingProtection(gpu_wait=False), Observation(True, False, 0.0, 0.0), "off", id="host-gate"
        ),
        pytest.param(DEFAULT, Observation(True, True, 0.0, 0.0), "stale", id="dead-writer"),
        pytest.param(DEFAULT, Observation(True, False, 1.0, 0.0), "max_wait", id="busy-past-max-wait"),
        pytest.param(DEFAULT, Observation(True, False, 0.1, 0.0), "share", id="share-exhausted"),
        pytest.param(
            ServingProtection(min_training_share=0.0),
            Observation(True, False, 0.1, 0.0),
            None,
            id="no-share",
        ),
    ],
)
def test_when_the_trainer_runs_anyway(
    settings: ServingProtection, seen: Observation, reason: str | None
) -> None:
    assert run_anyway(settings, seen) == reason


@pytest.mark.parametrize(("active", "idle_byte"), [(0, 1), (1, 0), (7, 0)])
def test_the_server_writes_its_idle_byte(tmp_path: Path, active: int, idle_byte: int) -> None:
    hint = LoadHint(tmp_path / "serving-load")
    raw = (tmp_path / "serving-load").read_bytes()
    assert raw[load_hint.SERVER_IDLE_BYTE] == 1  # a fresh hint: nothing in flight
    hint.set(active)
    raw = (tmp_path / "serving-load").read_bytes()
    assert raw[load_hint.SERVER_IDLE_BYTE] == idle_byte
    assert raw[load_hint.TRAINER_OPEN_BYTE] == 0  # never the server's to write
    assert read_hint(raw) is not None and read_hint(raw)[0] == active  # type: ignore[index]
    hint.close()


def test_a_version_1_hint_still_reads(tmp_path: Path) -> None:
    """A server from before the gate word (version 1) still protects through the host gate."""
    path = tmp_path / "serving-load"
    header = load_hint.pack_header(1, 2, 1, time.time())
    path.write_bytes(header.ljust(load_hint.HINT_BYTES, b"\0"))
    assert HintFileProbe(path).busy() is True


class FakeDevice:
    """Stands in for a DeviceGate, whose driver calls need a GPU (those run in the GPU test below): records
    what the serving gate asks of it."""

    def __init__(self) -> None:
        self.waits = 0
        self.settings: list[ServingProtection] = []
        self.closed = False

    def wait_here(self) -> None:
        self.waits += 1

    def update(self, settings: ServingProtection) -> None:
        self.settings.append(settings)

    def close(self, synchronize: object) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# (what the factory does on each call, clock advance between points, points, expected: factory calls, GPU
# waits, host points)
FACTORY_CASES = [
    pytest.param(["device"], 0.0, 3, 1, 3, 0, id="starts-once-then-waits-in-the-gpu"),
    pytest.param([None, "device"], 0.0, 3, 1, 0, 3, id="not-yet-retries-only-after-the-delay"),
    pytest.param([None, "device"], 11.0, 3, 2, 2, 1, id="not-yet-then-starts"),
    pytest.param(["error"], 11.0, 3, 1, 0, 3, id="an-error-keeps-the-host-gate-for-good"),
]


@pytest.mark.parametrize(
    ("outcomes", "advance_s", "points", "calls", "gpu_waits", "host_points"), FACTORY_CASES
)
def test_the_gate_starts_its_gpu_wait_when_it_can(
    outcomes: list[str | None], advance_s: float, points: int, calls: int, gpu_waits: int, host_points: int
) -> None:
    from hogwild.worker.protection import ServingGate
    from hogwild.worker.protection.device import DeviceGateError

    device = FakeDevice()
    made: list[str | None] = []

    def factory() -> FakeDevice | None:
        outcome = outcomes[min(len(made), len(outcomes) - 1)]
        made.append(outcome)
        if outcome == "error":
            raise DeviceGateError("no stream memory operations")
        return device if outcome == "device" else None

    clock = Clock()
    idle = type("Idle", (), {"busy": lambda self: False})()
    gate = ServingGate(idle, DEFAULT, clock=clock, device_factory=factory)  # type: ignore[arg-type]
    for _ in range(points):
        gate.point()
        clock.now += advance_s
    assert len(made) == calls
    assert device.waits == gpu_waits
    assert gate.stats.points == host_points
    # The status (and through it vLLM's log, hogwild.vllm_plugin.routes) says why it stayed on the host.
    assert ("no stream memory operations" in gate.stats.gpu_wait_error) is ("error" in outcomes)
    gate.close()
    assert device.closed is bool(gpu_waits)


def test_a_failing_gpu_wait_falls_back_to_the_host_for_good() -> None:
    from hogwild.worker.protection import ServingGate
    from hogwild.worker.protection.device import DeviceGateError

    class Failing(FakeDevice):
        def wait_here(self) -> None:
            raise DeviceGateError("cuStreamWaitValue32 failed with CUresult 999")

    device = Failing()
    idle = type("Idle", (), {"busy": lambda self: False})()
    gate = ServingGate(idle, DEFAULT, device_factory=lambda: device)  # type: ignore[arg-type,return-value]
    gate.point()
    gate.point()
    assert device.closed and gate.device is None
    assert gate.stats.points == 2  # both points took the host path
    assert gate.stats.gpu_wait_error == "failed: cuStreamWaitValue32 failed with CUresult 999"


def test_turning_the_gpu_wait_off_hot_goes_back_to_the_host() -> None:
    from hogwild.worker.protection import ServingGate

    device = FakeDevice()
    idle = type("Idle", (), {"busy": lambda self: False})()
    gate = ServingGate(idle, DEFAULT)  # type: ignore[arg-type]
    gate.use_device(device)  # type: ignore[arg-type]
    gate.point()
    gate.update(ServingProtection(gpu_wait=False))
    gate.point()
    assert device.waits == 1 and gate.stats.points == 1
    assert device.settings[-1].gpu_wait is False  # its watchdog opens the trainer's byte: "off"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _hint_dir(tmp_path: Path) -> Path:
    """/dev/shm where there is one, as the pod's memory-backed run dir."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        path = shm / f"hogwild-test-{tmp_path.name}"
        path.mkdir(exist_ok=True)
        return path
    return tmp_path


def _finished_within(event: torch.cuda.Event, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if event.query():
            return True
        time.sleep(0.002)
    return event.query()


def _kernel_after(point: Callable[[], None], target: torch.Tensor) -> torch.cuda.Event:
    """`point()`, then a kernel that fills `target` with ones; returns an event recorded after the kernel."""
    point()
    target.fill_(1.0)
    done = torch.cuda.Event()
    done.record()
    return done


# How the held kernel is let through: the server goes idle, its hint goes stale, or protection is turned off.
RELEASES = ["server-idle", "stale-hint", "protection-off", "close"]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("release", RELEASES)
def test_work_after_a_point_waits_in_the_gpu_while_the_server_is_busy(tmp_path: Path, release: str) -> None:
    from hogwild.worker.protection import GateStats, ServingGate
    from hogwild.worker.protection.device import DeviceGate

    directory = _hint_dir(tmp_path)
    server = LoadHint(directory / load_hint.HINT_NAME)
    server.set(1)
    gate = ServingGate(HintFileProbe(directory / load_hint.HINT_NAME), DEFAULT)
    target = torch.zeros(1 << 20, device="cuda")  # also makes this thread's CUDA context current
    torch.cuda.synchronize()
    stale_s = 0.5 if release == "stale-hint" else 60.0
    device = DeviceGate(
        directory / load_hint.HINT_NAME,
        DEFAULT,
        lambda: int(torch.cuda.current_stream().cuda_stream),
        GateStats(),
        stale_s=stale_s,
    )
    gate.use_device(device)
    server.set(1)  # a fresh update: the stale case counts from here
    done = _kernel_after(gate.point, target)
    try:
        assert not _finished_within(done, 0.1), "the kernel ran while the server was busy"
        if release == "server-idle":
            server.set(0)
        elif release == "protection-off":
            gate.update(ServingProtection(yield_when_busy=False))
        elif release == "close":
            device.close(torch.cuda.synchronize)  # opens the trainer's byte first, so this returns
        assert _finished_within(done, 2.0), f"still held after {release}"
        assert float(target.sum()) == float(1 << 20)
        assert device.stats.points == 1
    finally:
        if release != "close":
            device.close(torch.cuda.synchronize)
        server.close()


@pytest.mark.gpu
@cuda
def test_a_restarted_server_s_new_hint_file_is_followed(tmp_path: Path) -> None:
    """vLLM restarted: its new LoadHint replaces the file. The watchdog page-locks the new one (on its own
    thread, which needs the CUDA context) and the GPU waits on the new server's byte."""
    from hogwild.worker.protection import GateStats
    from hogwild.worker.protection.device import WATCH_S, try_device_gate

    directory = _hint_dir(tmp_path)
    first = LoadHint(directory / load_hint.HINT_NAME)
    target = torch.zeros(1 << 20, device="cuda")
    device = try_device_gate(directory / load_hint.HINT_NAME, DEFAULT, GateStats())
    assert device is not None
    first.close()
    second = LoadHint(directory / load_hint.HINT_NAME)  # a new file at the same path
    second.set(1)
    time.sleep(20 * WATCH_S)  # the watchdog notices the new inode
    done = _kernel_after(device.wait_here, target)
    try:
        assert not _finished_within(done, 0.1), "the new server's busy byte did not hold the stream"
        second.set(0)
        assert _finished_within(done, 2.0)
        assert float(target.sum()) == float(1 << 20)
    finally:
        device.close(torch.cuda.synchronize)
        second.close()
