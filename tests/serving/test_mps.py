"""MPS as opt-in serving protection: the environment each process gets, the share's validation, the
`hogwild serve` flag, and the daemon's start and stop.

The daemon flow runs against a stand-in `nvidia-cuda-mps-control` (a shell script that keeps the real one's
protocol: `-d` starts, commands on stdin, exit 1 when no daemon answers). The refusals run for real: this
machine has neither a GPU nor the binary. The real daemon was checked on an H100 by hand (see hogwild.mps).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hogwild import mps, mps_daemon
from hogwild.local import serve
from hogwild.local.session import LocalSession
from hogwild.mps import MpsDirs
from hogwild.mps_daemon import MpsDaemon, MpsError
from hogwild.testing.children import child_env

HOGWILD = (sys.executable, "-m", "hogwild.cli")


def run_hogwild(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, as a user runs it; its exit code and output, never raising."""
    return subprocess.run(
        [*HOGWILD, *args],
        cwd=cwd,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


DIRS = MpsDirs(pipe="/run/x/pipe", log="/run/x/log")
NO_BINARY = shutil.which(mps.CONTROL_BINARY) is None and not os.path.exists(mps.CONTROL_FALLBACK)
NO_GPU = not mps_daemon.cuda_device_nodes()
needs_cpu_machine = pytest.mark.skipif(
    not (NO_BINARY and NO_GPU), reason="checks the refusal on a machine without a GPU or the MPS binary"
)


# ---- the pure part ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            mps.serving_env(DIRS),
            {"CUDA_MPS_PIPE_DIRECTORY": "/run/x/pipe", "CUDA_MPS_LOG_DIRECTORY": "/run/x/log"},
        ),
        (
            mps.trainer_env(DIRS, 70),
            {
                "CUDA_MPS_PIPE_DIRECTORY": "/run/x/pipe",
                "CUDA_MPS_LOG_DIRECTORY": "/run/x/log",
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "70",
            },
        ),
        (
            mps.daemon_env(DIRS),
            {"CUDA_MPS_PIPE_DIRECTORY": "/run/x/pipe", "CUDA_MPS_LOG_DIRECTORY": "/run/x/log"},
        ),
    ],
    ids=["serving-keeps-every-sm", "trainer-is-capped", "daemon"],
)
def test_environment_of_each_process(env: dict[str, str], expected: dict[str, str]) -> None:
    assert env == expected


def test_pod_dirs_lie_under_the_shared_run_dir() -> None:
    dirs = mps.POD_DIRS
    assert (dirs.pipe, dirs.log) == ("/run/hogwild/mps/pipe", "/run/hogwild/mps/log")


@pytest.mark.parametrize("share", [1, 70, 100], ids=["min", "measured", "max"])
def test_share_in_range_is_kept(share: int) -> None:
    assert mps.check_share(share) == share


@pytest.mark.parametrize(
    "share", [0, 101, -5, 70.0, 70.5, True, "70", None], ids=lambda v: f"{type(v).__name__}-{v}"
)
def test_share_out_of_range_or_not_a_whole_number_is_refused(share: Any) -> None:
    with pytest.raises(ValueError, match=r"must be a whole number from 1 to 100 \(percent of the GPU's SMs"):
        mps.check_share(share)
    with pytest.raises(ValueError):
        mps.trainer_env(DIRS, share)


@pytest.mark.parametrize(
    ("text", "share"), [("70", 70), (" 1 ", 1), ("100", 100), ("0", None), ("101", None), ("7.5", None)]
)
def test_share_from_the_command_line(text: str, share: int | None) -> None:
    if share is None:
        with pytest.raises(ValueError, match="from 1 to 100"):
            mps.parse_share(text)
    else:
        assert mps.parse_share(text) == share


def test_daemon_command_lines() -> None:
    assert mps.start_command("/bin/mps") == ["/bin/mps", "-d"]
    assert mps.control_command("/bin/mps") == ["/bin/mps"]


# ---- hogwild serve --mps-trainer-share ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "share"),
    [([], None), (["--mps-trainer-share", "70"], 70), (["--mps-trainer-share=1"], 1)],
    ids=["off-by-default", "seventy", "equals-form"],
)
def test_serve_flag(argv: list[str], share: int | None) -> None:
    args, extra = serve.parse_args(["--model", "m", *argv, "--", "--enforce-eager"])
    assert args.mps_trainer_share == share
    assert extra == ["--enforce-eager"]


@pytest.mark.parametrize("value", ["0", "101", "half", "70.5"])
def test_serve_flag_out_of_range_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        serve.parse_args(["--model", "m", "--mps-trainer-share", value])
    assert exited.value.code == 2
    assert "argument --mps-trainer-share: must be a whole number from 1 to 100" in capsys.readouterr().err


def test_serve_help_documents_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        serve.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--mps-trainer-share PCT" in help_text and "default: off" in help_text


@pytest.mark.parametrize(
    ("process", "expected_share"), [("vllm", None), ("worker", "70")], ids=["vllm", "worker"]
)
def test_local_session_gives_each_process_its_mps_env(
    process: str, expected_share: str | None, tmp_path: Path
) -> None:
    session = LocalSession(model="m", state_dir=tmp_path, mps_trainer_share=70)
    session.mps_dirs = MpsDirs(pipe=str(tmp_path / "pipe"), log=str(tmp_path / "log"))
    env = session.process_env(process)
    assert env[mps.ENV_PIPE_DIR] == str(tmp_path / "pipe")
    assert env[mps.ENV_LOG_DIR] == str(tmp_path / "log")
    assert env.get(mps.ENV_THREAD_PERCENTAGE) == expected_share
    assert mps.ENV_START_DAEMON not in env, "locally the session starts the daemon itself"


def test_local_session_without_mps_adds_no_mps_env(tmp_path: Path) -> None:
    session = LocalSession(model="m", state_dir=tmp_path)
    for process in ("vllm", "worker"):
        assert mps.ENV_THREAD_PERCENTAGE not in session.process_env(process)


def test_local_session_refuses_a_bad_share(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="from 1 to 100"):
        LocalSession(model="m", state_dir=tmp_path, mps_trainer_share=0)


@needs_cpu_machine
def test_serve_refuses_mps_without_a_gpu_before_starting_anything(tmp_path: Path) -> None:
    result = run_hogwild(
        ["serve", "--model", "m", "--state-dir", str(tmp_path), "--mps-trainer-share", "70"], tmp_path
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "hogwild serve: cannot use MPS: MPS needs an NVIDIA GPU" in result.stderr
    assert "serving" not in result.stdout


# ---- finding the binary and a device ------------------------------------------------------------------
def executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_binary_on_path_is_found(tmp_path: Path) -> None:
    binary = executable(tmp_path / mps.CONTROL_BINARY)
    assert mps_daemon.find_control_binary(path=str(tmp_path), fallback="/nonexistent") == str(binary)


def test_binary_at_the_fallback_is_found(tmp_path: Path) -> None:
    fallback = executable(tmp_path / "elsewhere")
    assert mps_daemon.find_control_binary(path=str(tmp_path / "empty"), fallback=str(fallback)) == str(
        fallback
    )


def test_missing_binary_is_named(tmp_path: Path) -> None:
    with pytest.raises(MpsError, match=f"MPS needs {mps.CONTROL_BINARY}, found neither on PATH nor at /nope"):
        mps_daemon.find_control_binary(path=str(tmp_path), fallback="/nope")


@needs_cpu_machine
def test_daemon_start_without_the_binary_fails_naming_it(tmp_path: Path) -> None:
    """The real lookup (PATH and /usr/local/nvidia/bin), on this machine that has no NVIDIA driver."""
    with pytest.raises(MpsError, match=f"MPS needs {mps.CONTROL_BINARY}.*NVIDIA driver"):
        MpsDaemon.start(MpsDirs.under(tmp_path))


@pytest.mark.parametrize(
    ("nodes", "has_gpu"),
    [
        ([], False),
        (["nvidiactl", "nvidia-uvm"], False),
        (["nvidiactl", "nvidia0"], True),
        (["nvidia3"], True),
    ],
    ids=["no-nodes", "driver-without-gpu", "one-gpu", "other-index"],
)
def test_cuda_device_check(nodes: list[str], has_gpu: bool, tmp_path: Path) -> None:
    for node in nodes:
        (tmp_path / node).touch()
    if has_gpu:
        mps_daemon.require_cuda_device(tmp_path)
    else:
        with pytest.raises(MpsError, match="MPS needs an NVIDIA GPU"):
            mps_daemon.require_cuda_device(tmp_path)


# ---- the daemon's life, against a stand-in binary -----------------------------------------------------
FAKE = """#!/bin/sh
# Stand-in for nvidia-cuda-mps-control: -d starts (socket stand-in + marker), stdin commands, exit 1 if none runs.
pipe="$CUDA_MPS_PIPE_DIRECTORY"
calls="$CUDA_MPS_LOG_DIRECTORY/calls"
if [ "$1" = "-d" ]; then
  echo start >> "$calls"
  [ -n "$FAIL_START" ] && exit 1
  touch "$pipe/control" "$pipe/running"
  exit 0
fi
read cmd
echo "$cmd" >> "$calls"
[ -f "$pipe/running" ] || { echo "Cannot find MPS control daemon process" >&2; exit 1; }
[ "$cmd" = quit ] && rm -f "$pipe/running"
exit 0
"""


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    return executable(tmp_path / mps.CONTROL_BINARY, FAKE)


def calls(dirs: MpsDirs) -> list[str]:
    path = Path(dirs.log) / "calls"
    return path.read_text().split() if path.exists() else []


def test_start_then_stop(fake: Path, tmp_path: Path) -> None:
    dirs = MpsDirs.under(tmp_path / "mps")
    daemon = MpsDaemon.start(dirs, binary=str(fake), timeout_s=10)
    assert daemon.owned and mps_daemon.is_running(str(fake), dirs)
    daemon.stop()
    assert not mps_daemon.is_running(str(fake), dirs)
    assert calls(dirs)[0] == "start" and calls(dirs)[-2] == "quit"


def test_a_running_daemon_is_reused_and_left_running(fake: Path, tmp_path: Path) -> None:
    dirs = MpsDirs.under(tmp_path / "mps")
    first = MpsDaemon.start(dirs, binary=str(fake), timeout_s=10)
    second = MpsDaemon.start(dirs, binary=str(fake), timeout_s=10)
    assert not second.owned
    second.stop()
    assert mps_daemon.is_running(str(fake), dirs), "stop() quits only a daemon it started"
    assert calls(dirs).count("start") == 1
    first.stop()


def test_leftovers_of_a_dead_daemon_are_cleared_before_starting(fake: Path, tmp_path: Path) -> None:
    dirs = MpsDirs.under(tmp_path / "mps")
    Path(dirs.pipe).mkdir(parents=True)
    (Path(dirs.pipe) / "control").touch()  # the socket a killed daemon leaves
    (Path(dirs.pipe) / "nvidia-cuda-mps-control.pid").write_text("12345")
    assert not mps_daemon.is_running(str(fake), dirs)
    daemon = MpsDaemon.start(dirs, binary=str(fake), timeout_s=10)
    assert daemon.owned and not (Path(dirs.pipe) / "nvidia-cuda-mps-control.pid").exists()
    daemon.stop()


def test_a_daemon_that_does_not_come_up_is_an_error_pointing_at_its_log(
    fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIL_START", "1")
    dirs = MpsDirs.under(tmp_path / "mps")
    expected = re.escape(f"did not come up (exit code 1); see {dirs.log}/control.log")
    with pytest.raises(MpsError, match=expected):
        MpsDaemon.start(dirs, binary=str(fake), timeout_s=5)


def test_local_session_starts_the_daemon_before_vllm_and_stops_it_last(
    fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start()/stop() of local mode with the processes replaced by a record of the order."""
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr("hogwild.local.session.require_cuda_device", lambda dev="/dev": None)
    session = LocalSession(model="m", state_dir=tmp_path / "state", mps_trainer_share=70)
    order: list[str] = []

    def running() -> bool:
        return session.mps_dirs is not None and mps_daemon.is_running(str(fake), session.mps_dirs)

    monkeypatch.setattr(session, "start_vllm", lambda: order.append(f"vllm daemon={running()}"))
    monkeypatch.setattr(session, "start_worker", lambda: order.append(f"worker daemon={running()}"))
    session.start()
    dirs = session.mps_dirs
    assert dirs is not None and Path(dirs.log).parent == tmp_path / "state"
    session.stop()
    assert order == ["vllm daemon=True", "worker daemon=True"]
    assert calls(dirs)[-1] == "quit"
    assert not Path(dirs.pipe).exists(), "the private pipe dir is removed"


# ---- the pod's vllm container: `hogwild vllm` starts the daemon when asked ----------------------------
@pytest.mark.parametrize(
    ("environ", "outcome"),
    [
        ({}, None),
        ({mps.ENV_START_DAEMON: "0"}, None),
        ({mps.ENV_START_DAEMON: "1"}, "needs CUDA_MPS_PIPE_DIRECTORY and CUDA_MPS_LOG_DIRECTORY"),
    ],
    ids=["not-asked", "flag-off", "flag-without-dirs"],
)
def test_start_if_asked(environ: dict[str, str], outcome: str | None) -> None:
    if outcome is None:
        assert mps_daemon.start_if_asked(environ) is None
    else:
        with pytest.raises(MpsError, match=outcome):
            mps_daemon.start_if_asked(environ)


def test_start_if_asked_starts_it(fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    dirs = MpsDirs.under(tmp_path / "mps")
    daemon = mps_daemon.start_if_asked({mps.ENV_START_DAEMON: "1", **mps.serving_env(dirs)})
    assert daemon is not None and daemon.owned and daemon.dirs == dirs
    daemon.stop()


@needs_cpu_machine
def test_vllm_launcher_refuses_when_asked_for_mps_without_the_binary(tmp_path: Path) -> None:
    """The real `hogwild vllm`, as the pod's vllm container runs it: it exits before vLLM starts."""
    env = {**os.environ, mps.ENV_START_DAEMON: "1", **mps.serving_env(MpsDirs.under(tmp_path / "mps"))}
    result = run_hogwild(
        ["vllm", "--model", str(tmp_path), "--checkpoint-dir", "ck", "--run-dir", "run"], tmp_path, env
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"hogwild vllm: MPS needs {mps.CONTROL_BINARY}" in result.stderr
    assert "serving" not in result.stderr
