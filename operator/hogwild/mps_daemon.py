"""Start and stop the user-space MPS control daemon that `hogwild.mps` describes (the thin I/O part).

Local mode (`hogwild serve --mps-trainer-share`) starts it before vLLM and stops it after both processes have
exited. In a pod, `hogwild vllm` starts it (`start_if_asked`) before vLLM initialises CUDA, because vLLM's
container starts first; the daemon then lives as long as that container.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hogwild import mps
from hogwild.mps import MpsDirs

log = logging.getLogger("hogwild.mps")
CONTROL_TIMEOUT_S = 10.0


class MpsError(RuntimeError):
    """MPS cannot be used here; the message says why and what to do."""


def find_control_binary(path: str | None = None, fallback: str = mps.CONTROL_FALLBACK) -> str:
    """`nvidia-cuda-mps-control` on PATH (or `path`), else the fallback location; MpsError names both."""
    found = shutil.which(mps.CONTROL_BINARY, path=path)
    if found:
        return found
    if os.path.isfile(fallback) and os.access(fallback, os.X_OK):
        return fallback
    raise MpsError(
        f"MPS needs {mps.CONTROL_BINARY}, found neither on PATH nor at {fallback}. It ships with the NVIDIA "
        "driver: run on a GPU machine (in a container, with the NVIDIA runtime's compute capability)"
    )


def cuda_device_nodes(dev: str | os.PathLike[str] = "/dev") -> list[str]:
    return sorted(glob.glob(os.path.join(os.fspath(dev), "nvidia[0-9]*")))


def require_cuda_device(dev: str | os.PathLike[str] = "/dev") -> None:
    if not cuda_device_nodes(dev):
        raise MpsError(f"MPS needs an NVIDIA GPU, and there is none here (no {os.fspath(dev)}/nvidia<N>)")


def _control(binary: str, dirs: MpsDirs, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        mps.control_command(binary),
        input=command,
        env={**os.environ, **mps.daemon_env(dirs)},
        capture_output=True,
        text=True,
        timeout=CONTROL_TIMEOUT_S,
        check=False,
    )


def is_running(binary: str, dirs: MpsDirs) -> bool:
    """Whether a daemon answers on `dirs.pipe` (the socket a stopped or killed daemon left does not)."""
    if not (Path(dirs.pipe) / mps.CONTROL_SOCKET).exists():
        return False
    try:
        return _control(binary, dirs, mps.QUERY).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass
class MpsDaemon:
    binary: str
    dirs: MpsDirs
    owned: bool  # started by us: stop() quits only what it started

    @classmethod
    def start(cls, dirs: MpsDirs, binary: str | None = None, timeout_s: float = 30.0) -> MpsDaemon:
        """Start the daemon unless one already answers on these dirs; return once it answers."""
        binary = binary or find_control_binary()
        for path in (dirs.pipe, dirs.log):
            Path(path).mkdir(parents=True, exist_ok=True)
        if is_running(binary, dirs):
            log.info("MPS daemon already running", extra={"event": "mps_reused", "pipe_dir": dirs.pipe})
            return cls(binary, dirs, owned=False)
        # The dirs are private to hogwild: what is left in the pipe dir belongs to a daemon that is gone
        # (a restarted container finds its memory-backed emptyDir as it was).
        for stale in Path(dirs.pipe).iterdir():
            if not stale.is_dir():
                stale.unlink(missing_ok=True)
        # -d forks the daemon and returns; DEVNULL so that nothing waits on the daemon's inherited output.
        result = subprocess.run(
            mps.start_command(binary),
            env={**os.environ, **mps.daemon_env(dirs)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout_s,
            check=False,
        )
        daemon = cls(binary, dirs, owned=True)
        deadline = time.monotonic() + timeout_s
        while result.returncode == 0 and time.monotonic() < deadline:
            if is_running(binary, dirs):
                log.info(
                    "MPS daemon started",
                    extra={"event": "mps_started", "binary": binary, "pipe_dir": dirs.pipe},
                )
                return daemon
            time.sleep(0.1)
        daemon.stop()
        raise MpsError(
            f"{binary} -d did not come up (exit code {result.returncode}); see {dirs.log}/control.log"
        )

    def stop(self) -> None:
        """Tell the daemon we started to quit (its MPS server goes once the clients have exited)."""
        if not self.owned:
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            _control(self.binary, self.dirs, mps.QUIT)
        self.owned = False
        log.info("MPS daemon told to quit", extra={"event": "mps_stopped", "pipe_dir": self.dirs.pipe})


def start_if_asked(environ: Mapping[str, str]) -> MpsDaemon | None:
    """In the pod's vllm container: start the daemon when the pod builder set `mps.ENV_START_DAEMON`."""
    if environ.get(mps.ENV_START_DAEMON) != "1":
        return None
    missing = [name for name in (mps.ENV_PIPE_DIR, mps.ENV_LOG_DIR) if not environ.get(name)]
    if missing:
        raise MpsError(f"{mps.ENV_START_DAEMON}=1 needs {' and '.join(missing)} set as well")
    return MpsDaemon.start(MpsDirs(pipe=environ[mps.ENV_PIPE_DIR], log=environ[mps.ENV_LOG_DIR]))
