"""Local mode: vLLM with the plugin plus the training worker, as two local processes.

The same ports, protocol and layout as the pod: a run dir (manifest + worker socket + load hint), a checkpoint
dir and a token file. The last two live under the state dir; the run dir on /dev/shm where there is one
(`run_dir_for`), memory-backed like the pod's. vLLM starts first and stops last, because it owns the weight memory that
the worker maps; the worker stops first, writing a final checkpoint on SIGTERM. A worker that crashes is
restarted (`supervise`, with hogwild.local.supervision's backoff and limit) while vLLM keeps serving; a vLLM
that exits ends local mode. The worker's metrics listen on loopback unless `metrics_host` says otherwise. With `mps_trainer_share`,
an MPS control daemon (hogwild.mps) starts before vLLM and stops after it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hogwild import auth, defaults, mps
from hogwild.local.supervision import RestartPolicy
from hogwild.mps_daemon import MpsDaemon, require_cuda_device

STOP_TIMEOUT_S = 60.0


class LocalModeError(RuntimeError):
    pass


def http_json(
    method: str, url: str, body: Any = None, token: str | None = None, timeout_s: float = 30.0
) -> tuple[int, dict[str, Any]]:
    """One JSON request with the standard library; returns (status, parsed body) even for 4xx/5xx."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"raw": raw.decode(errors="replace")}


def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """Wait until no process of the group is left (vLLM's engine and worker outlive its API server)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
    """Signal a child's whole process group, wait for all of it, SIGKILL what is left after the timeout."""
    if proc.poll() is None or not wait_group_gone(proc.pid, 0):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s)
        if not wait_group_gone(proc.pid, max(1.0, timeout_s / 4)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            wait_group_gone(proc.pid, 10.0)
    return proc.wait()


def load_or_create_token(path: Path) -> str:
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = auth.generate_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


SHM = Path("/dev/shm")


def run_dir_for(state_dir: Path, shm: Path = SHM) -> Path:
    """Where local mode keeps its run dir: a private dir on the memory-backed `shm` where it can make one,
    else `state_dir/run`.

    Why: the GPU-side wait page-locks the load-hint file in the run dir (cuMemHostRegister), which failed with
    CUresult 1 for a file on disk beside real vLLM on an H200 and worked on tmpfs (bench/RESULTS.md); a pod's
    run dir is a memory-backed emptyDir. One dir per user and state dir (the same one after a restart); a name
    that is not a private dir of ours (someone else's, a link, open to others) falls back to the state dir.
    """
    fallback = state_dir / "run"
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return fallback
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:16]
    path = shm / f"hogwild-{os.getuid()}-{digest}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return fallback
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return fallback
    return path


@dataclass
class LocalSession:
    model: str
    state_dir: Path
    port: int = defaults.VLLM_HTTP_PORT
    metrics_port: int = defaults.WORKER_METRICS_PORT
    vllm_args: Sequence[str] = ()
    config: dict[str, Any] = field(default_factory=dict)
    log_to_files: bool = False
    host: str = "127.0.0.1"
    extra_env: dict[str, str] = field(default_factory=dict)
    mps_trainer_share: int | None = None  # percent of the SMs; None: no MPS
    metrics_host: str = "127.0.0.1"
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    shm: Path = SHM  # where the run dir goes when it can (run_dir_for)
    # Replicas (hogwild.local.replicas): where the token and the checkpoints live when several sessions share
    # them; None: under state_dir.
    shared_dir: Path | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _log_files: list[IO[bytes]] = field(default_factory=list)
    _mps: MpsDaemon | None = None
    _worker_restarts: list[float] = field(default_factory=list)  # monotonic times
    _worker_restart_at: float | None = None

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.run_dir = run_dir_for(self.state_dir, Path(self.shm))
        shared = Path(self.shared_dir) if self.shared_dir is not None else self.state_dir
        self.checkpoint_dir = shared / "checkpoints"
        self.token_file = shared / "token"
        self.token = load_or_create_token(self.token_file)
        self.mps_dirs: mps.MpsDirs | None = None
        if self.mps_trainer_share is not None:
            mps.check_share(self.mps_trainer_share)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env[defaults.ENV_RUN_DIR] = str(self.run_dir)
        env[defaults.ENV_CHECKPOINT_DIR] = str(self.checkpoint_dir)
        env[defaults.ENV_TOKEN_FILE] = str(self.token_file)
        env.pop(defaults.ENV_TOKEN, None)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def process_env(self, name: str) -> dict[str, str]:
        """`env()` plus what this process needs as an MPS client, if MPS is on."""
        env = self.env()
        if self.mps_dirs is not None and self.mps_trainer_share is not None:
            if name == "worker":
                env.update(mps.trainer_env(self.mps_dirs, self.mps_trainer_share))
            else:
                env.update(mps.serving_env(self.mps_dirs))
        return env

    def start_mps(self) -> None:
        """Refuse without a GPU or the binary; else start the daemon that both processes will use."""
        require_cuda_device()
        # A short private pipe dir (it holds UNIX sockets, whose paths are limited); the log under the state dir.
        pipe = tempfile.mkdtemp(prefix="hogwild-mps-")
        self.mps_dirs = mps.MpsDirs(pipe=pipe, log=str(self.state_dir / "mps-log"))
        self._mps = MpsDaemon.start(self.mps_dirs)

    def stop_mps(self) -> None:
        if self._mps is not None:
            self._mps.stop()
            self._mps = None
        if self.mps_dirs is not None:
            shutil.rmtree(self.mps_dirs.pipe, ignore_errors=True)
            self.mps_dirs = None

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        out: Any = None
        if self.log_to_files:
            handle = open(self.state_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
            self._log_files.append(handle)
            out = handle
        # Own process group: Ctrl-C in the terminal reaches only us, and we stop the children in order.
        proc = subprocess.Popen(
            argv,
            env=self.process_env(name),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        self.processes[name] = proc
        # Which process is which, for whoever runs local mode (and the replica tests that kill one): each
        # child leads its own process group, so `kill -- -PID` reaches all of it.
        pids = {n: p.pid for n, p in self.processes.items()}
        (self.state_dir / "pids.json").write_text(json.dumps(pids))
        return proc

    def start_vllm(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "hogwild.cli",
            "vllm",
            "--model",
            self.model,
            "--run-dir",
            str(self.run_dir),
            "--checkpoint-dir",
            str(self.checkpoint_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--",
            *self.vllm_args,
        ]
        self._spawn("vllm", argv)

    def start_worker(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "hogwild.cli",
            "worker",
            "--run-dir",
            str(self.run_dir),
            "--checkpoint-dir",
            str(self.checkpoint_dir),
            "--metrics-port",
            str(self.metrics_port),
            "--metrics-host",
            self.metrics_host,
        ]
        if self.config:
            argv += ["--config", json.dumps(self.config)]
        self._spawn("worker", argv)

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A manifest left by an earlier run names an exporter that is gone; never let the worker map it.
        (self.run_dir / defaults.MANIFEST_NAME).unlink(missing_ok=True)
        if self.mps_trainer_share is not None:
            self.start_mps()  # before vLLM: an MPS client must find the daemon when it initialises CUDA
        self.start_vllm()
        self.start_worker()

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise LocalModeError(f"{name} exited with code {proc.returncode}{self._log_hint(name)}")

    def supervise(self, out: IO[str] = sys.stdout) -> None:
        """One look at the children: raise LocalModeError when vLLM is gone; restart a dead worker.

        Non-blocking: a restart waits out its backoff over later calls (the serve loop calls this twice a
        second), so Ctrl-C is never held up. Past the policy's limit, it raises."""
        vllm = self.processes.get("vllm")
        if vllm is not None and vllm.poll() is not None:
            raise LocalModeError(f"vllm exited with code {vllm.returncode}{self._log_hint('vllm')}")
        worker = self.processes.get("worker")
        if worker is None or worker.poll() is None:
            return
        now = time.monotonic()
        if self._worker_restart_at is None:
            delay = self.restart_policy.next_delay(self._worker_restarts, now)
            if delay is None:
                print(
                    f"hogwild: worker exited with code {worker.returncode}; it was restarted "
                    f"{self.restart_policy.max_restarts} times in {self.restart_policy.window_s:.0f} s, giving up",
                    file=out,
                    flush=True,
                )
                raise LocalModeError(
                    f"worker exited with code {worker.returncode} and reached the restart limit"
                    f"{self._log_hint('worker')}"
                )
            print(
                f"hogwild: worker exited with code {worker.returncode}{self._log_hint('worker')}; vLLM keeps "
                f"serving; restarting the worker in {delay:g} s",
                file=out,
                flush=True,
            )
            self._worker_restart_at = now + delay
        if now >= self._worker_restart_at:
            self._worker_restart_at = None
            self._worker_restarts.append(now)
            self.start_worker()
            print(
                f"hogwild: worker restarted (pid {self.processes['worker'].pid}, restart "
                f"{len(self._worker_restarts)}); it maps the served weights and restores the newest optimizer "
                "state",
                file=out,
                flush=True,
            )

    def _log_hint(self, name: str) -> str:
        return f" (see {self.state_dir / f'{name}.log'})" if self.log_to_files else ""

    def wait_ready(self, timeout_s: float = 300.0) -> dict[str, Any]:
        """Until vLLM answers /health and the worker has mapped the weights. Returns the train status."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                status, body = http_json("GET", f"{self.url}/train/status", timeout_s=5.0)
            except (urllib.error.URLError, OSError, ValueError):
                status, body = 0, {}
            if status == 200 and body.get("connected"):
                return body
            time.sleep(0.5)
        raise LocalModeError(f"local mode not ready after {timeout_s:.0f} s")

    def stop_process(
        self, name: str, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S
    ) -> int | None:
        proc = self.processes.pop(name, None)
        return None if proc is None else stop_group(proc, sig, timeout_s)

    def stop(self) -> None:
        # The worker maps vLLM's memory: it goes first (and checkpoints on SIGTERM), vLLM last.
        self.stop_process("worker")
        self.stop_process("vllm")
        self.stop_mps()  # last: both clients are gone
        # vLLM's worker dies by signal and cannot unlink its shared weights file: sweep it (and any other
        # file whose exporter is gone).
        from hogwild.sharing import sweep_stale_shm

        sweep_stale_shm()
        if self.run_dir.parent == Path(self.shm):  # memory: nothing in it outlives the processes that used it
            shutil.rmtree(self.run_dir, ignore_errors=True)
        for handle in self._log_files:
            handle.close()
        self._log_files.clear()

    def watch_progress(self, interval_s: float = 2.0, out: IO[str] = sys.stdout) -> threading.Event:
        """Print a line whenever the worker's step moves while a /train is in flight. Returns a stop flag."""
        stop = threading.Event()

        def loop() -> None:
            last_step = None
            while not stop.wait(interval_s):
                try:
                    status, body = http_json("GET", f"{self.url}/train/status", timeout_s=5.0)
                except (urllib.error.URLError, OSError, ValueError):
                    continue
                if status == 200 and body.get("busy") and body.get("step") != last_step:
                    last_step = body.get("step")
                    loss = body.get("loss")
                    loss_text = f"{loss:.4f}" if isinstance(loss, float) else "-"
                    print(
                        f"  training… step {last_step}  loss {loss_text}  tokens {body.get('tokens_trained')}",
                        file=out,
                        flush=True,
                    )

        threading.Thread(target=loop, daemon=True, name="hogwild-progress").start()
        return stop

    def __enter__(self) -> LocalSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
