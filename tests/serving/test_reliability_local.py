"""Local mode survives a worker crash: vLLM owns the weights and keeps serving while the worker is restarted
with backoff, up to a limit; and nothing of local mode listens beyond loopback.

Real: `hogwild worker` processes started by LocalSession, mapping a stand-in exporter's weights (the exporter
plays vLLM's part: it holds the weights and keeps them while the worker dies); kill -9 as the crash.
"""

from __future__ import annotations

import io
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hogwild.defaults import MANIFEST_NAME, WORKER_SOCKET_NAME
from hogwild.local.session import LocalModeError, LocalSession
from hogwild.local.supervision import RestartPolicy
from hogwild.protocol import ProtocolError
from hogwild.testing.children import child_env
from hogwild.testing.exporter import ExporterProcess
from hogwild.testing.tiny_model import cached
from hogwild.testing.worker_process import call
from vllm_helpers import free_port
from worker_helpers import ENV

# ---- the restart policy (pure) ----------------------------------------------------------------------------
POLICY = RestartPolicy(max_restarts=3, window_s=100.0, base_delay_s=1.0, max_delay_s=3.0)
SCHEDULES = {
    "first crash: 1 s": ([], 50.0, 1.0),
    "second crash: doubles": ([10.0], 50.0, 2.0),
    "third crash: capped": ([10.0, 20.0], 50.0, 3.0),
    "fourth crash within the window: give up": ([10.0, 20.0, 30.0], 50.0, None),
    "old restarts have left the window": ([10.0, 20.0, 30.0], 125.0, 2.0),
}


@pytest.mark.parametrize(("restarts", "now", "delay"), SCHEDULES.values(), ids=SCHEDULES.keys())
def test_restart_delays_back_off_and_stop_at_the_limit(
    restarts: list[float], now: float, delay: float | None
) -> None:
    assert POLICY.next_delay(restarts, now) == delay


# ---- a session whose worker crashes ------------------------------------------------------------------------
@pytest.fixture
def session(exporter: ExporterProcess, tmp_path: Path) -> Iterator[LocalSession]:
    """A LocalSession whose "vllm" is the exporter's stand-in: a process that holds the weights."""
    local = LocalSession(
        model=str(cached()),
        state_dir=tmp_path,
        metrics_port=free_port(),
        extra_env={**ENV, "PYTHONPATH": child_env()["PYTHONPATH"]},
        log_to_files=True,
        restart_policy=RestartPolicy(max_restarts=2, window_s=600.0, base_delay_s=0.2, max_delay_s=0.5),
    )
    local.run_dir.mkdir(parents=True, exist_ok=True)  # on /dev/shm, LocalSession made it already
    shutil.copyfile(exporter.run_dir / MANIFEST_NAME, local.run_dir / MANIFEST_NAME)
    # The serving process: alive as long as the test, as vLLM would be.
    local.processes["vllm"] = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    local.start_worker()
    try:
        yield local
    finally:
        local.stop_process("worker", timeout_s=10)
        local.stop_process("vllm", sig=signal.SIGKILL, timeout_s=5)


def worker_status(local: LocalSession, timeout_s: float = 120.0) -> dict:
    address = f"ipc://{local.run_dir / WORKER_SOCKET_NAME}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = call(address, "status", wait_s=5)
            if status["connected"]:
                return status
        except (ProtocolError, OSError):  # not up yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"worker not connected after {timeout_s} s")


def supervise_until(local: LocalSession, out: io.StringIO, done: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        local.supervise(out=out)
        if callable(done) and done():
            return
        time.sleep(0.05)
    raise TimeoutError(f"not done after {timeout_s} s; output:\n{out.getvalue()}")


def test_a_killed_worker_is_restarted_and_maps_the_weights_again(session: LocalSession) -> None:
    first = worker_status(session)
    crashed = session.processes["worker"]
    crashed.kill()
    out = io.StringIO()
    supervise_until(session, out, lambda: session.processes["worker"] is not crashed)
    second = worker_status(session)
    assert second["incarnation"] != first["incarnation"] and second["connected"]
    assert session.processes["vllm"].poll() is None
    text = out.getvalue()
    assert "worker exited with code -9" in text and "restart" in text


def test_the_supervisor_gives_up_after_the_restart_limit(session: LocalSession) -> None:
    out = io.StringIO()
    with pytest.raises(LocalModeError, match="restart"):
        for _ in range(3):  # the policy allows two restarts
            old = session.processes["worker"]
            old.kill()
            old.wait()
            supervise_until(session, out, lambda old=old: session.processes["worker"] is not old)
    assert "giving up" in out.getvalue()


def listening_addresses(port: int) -> set[str]:
    """Local addresses of TCP sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_the_worker_metrics_listen_on_loopback_only(session: LocalSession) -> None:
    worker_status(session)
    addresses = listening_addresses(session.metrics_port)
    assert addresses, "nothing listens on the metrics port"
    # 0100007F is 127.0.0.1 in /proc's byte order; 0.0.0.0 would be 00000000.
    assert addresses == {"0100007F"}
