"""NVIDIA MPS (Multi-Process Service) for the two processes that share one GPU: vLLM and the trainer.

Why: without MPS the GPU time-slices between the two CUDA contexts, so a serving step that arrives while the
trainer has work resident waits for the trainer's slice. Under MPS both processes are clients of one MPS
server, their kernels run side by side, and the trainer is capped to a share of the SMs
(`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`). Measured on an H100 (bench/results/gpu.json `interference_mps`, 1.5B,
serving at half load beside training, default protection): serving p99 21.7 ms with the trainer at 70 % of
the SMs, 23.9 ms without MPS, training beside the loaded server as fast; CUDA IPC (the zero-copy weight
sharing) worked between the clients. Kubernetes is not verified (see hogwild.operator.pod_builder). Opt-in,
not default: MPS clients share one GPU server, so a fatal GPU fault in the trainer takes vLLM's context down with it.

The daemon is a user-space one with private pipe and log dirs: only processes that initialise CUDA with these
dirs in their environment become its clients, and the card's compute mode and other settings are never
touched. Each client needs its environment *before* it initialises CUDA, so whoever starts the processes sets
it. Pure: this module builds environments and command lines; `hogwild.mps_daemon` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from hogwild import defaults

ENV_PIPE_DIR = "CUDA_MPS_PIPE_DIRECTORY"
ENV_LOG_DIR = "CUDA_MPS_LOG_DIRECTORY"
ENV_THREAD_PERCENTAGE = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
# Set (to "1") on the pod's vllm container only: `hogwild vllm` starts the daemon before vLLM touches CUDA.
ENV_START_DAEMON = "HOGWILD_MPS_START_DAEMON"

CONTROL_BINARY = "nvidia-cuda-mps-control"
CONTROL_FALLBACK = "/usr/local/nvidia/bin/nvidia-cuda-mps-control"  # where GKE's driver installer puts it
# What a running daemon leaves in its pipe dir (seen on an H100, driver 580): the UNIX sockets `control` and
# `control_privileged`, a fifo `log`, `control_lock` and `nvidia-cuda-mps-control.pid`; the sockets stay after
# it quits or is killed, so only an answer to QUERY tells that it runs.
CONTROL_SOCKET = "control"
QUIT = "quit\n"  # stdin of `nvidia-cuda-mps-control`: stop the daemon (and its server once clients are gone)
QUERY = (
    "get_server_list\n"  # exit 0 while a daemon listens; 1 and "Cannot find MPS control daemon process" not
)

SHARE_MIN, SHARE_MAX = 1, 100
# In the pod: under the memory-backed emptyDir that both containers mount (a short path: the pipe dir holds
# UNIX sockets, whose paths are limited to 107 bytes).
POD_ROOT = f"{defaults.RUN_DIR}/mps"


@dataclass(frozen=True)
class MpsDirs:
    """The daemon's private pipe dir (its sockets) and log dir (control.log, server.log)."""

    pipe: str
    log: str

    @classmethod
    def under(cls, root: str | PurePosixPath) -> MpsDirs:
        base = PurePosixPath(root)
        return cls(pipe=str(base / "pipe"), log=str(base / "log"))


POD_DIRS = MpsDirs.under(POD_ROOT)


def check_share(value: Any) -> int:
    """The trainer's share of the GPU's SMs, in percent: a whole number from 1 to 100 (bool and float refused).

    Raises ValueError with a message that reads after a field name (`spec.gpu.mps.trainerSharePercent: ...`).
    """
    if isinstance(value, bool) or not isinstance(value, int) or not SHARE_MIN <= value <= SHARE_MAX:
        raise ValueError(
            f"must be a whole number from {SHARE_MIN} to {SHARE_MAX} (percent of the GPU's SMs the trainer "
            f"may use under MPS), got {value!r}"
        )
    return value


def parse_share(text: str) -> int:
    """`check_share` for command-line text such as "70"."""
    try:
        value: Any = int(text.strip(), 10)
    except ValueError:
        value = text
    return check_share(value)


def daemon_env(dirs: MpsDirs) -> dict[str, str]:
    """What the control daemon and each of its clients must agree on: the pipe and log dirs."""
    return {ENV_PIPE_DIR: dirs.pipe, ENV_LOG_DIR: dirs.log}


def serving_env(dirs: MpsDirs) -> dict[str, str]:
    """The vLLM process: an MPS client with every SM available."""
    return daemon_env(dirs)


def trainer_env(dirs: MpsDirs, share_percent: int) -> dict[str, str]:
    """The trainer: an MPS client capped to `share_percent` % of the SMs."""
    return {**daemon_env(dirs), ENV_THREAD_PERCENTAGE: str(check_share(share_percent))}


def start_command(binary: str) -> list[str]:
    """Start the control daemon in the background (`-d`); it reads its dirs from the environment."""
    return [binary, "-d"]


def control_command(binary: str) -> list[str]:
    """Talk to a running daemon: the command (QUIT, QUERY) goes on stdin."""
    return [binary]
