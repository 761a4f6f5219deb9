"""Local mode with replicas: `hogwild serve --replicas N` runs N vLLM engines, each with its worker, as one
replica group (docs/replicas.md), the same way N pods of a session do.

Replica i is a `LocalSession` of its own (its own run dir, vLLM on `port + i`, worker metrics on
`metrics_port + i`), all sharing one token and one checkpoint dir. The group's store lives here, in the
serving process, so that a replica lost (any of them, the first one too) never takes the store with it. A
replica whose vLLM exits is restarted whole (worker first stopped, then vLLM and worker started again),
with the restart policy's backoff and limit; the others keep serving and training meanwhile, and the
returning replica receives the group's weights before it trains. `scale(n)` adds or removes replicas hot.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hogwild import defaults
from hogwild.local.session import LocalModeError, LocalSession, load_or_create_token
from hogwild.local.supervision import RestartPolicy


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class LocalReplicas:
    model: str
    state_dir: Path
    replicas: int = 2
    port: int = defaults.VLLM_HTTP_PORT
    metrics_port: int = defaults.WORKER_METRICS_PORT
    vllm_args: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    log_to_files: bool = False
    host: str = "127.0.0.1"
    metrics_host: str = "127.0.0.1"
    rendezvous_port: int = 0  # 0: a free port
    settle_s: float = 2.0
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    sessions: dict[int, LocalSession] = field(default_factory=dict)
    _store: Any = None
    _restarts: dict[int, list[float]] = field(default_factory=dict)
    _restart_at: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise LocalModeError(f"--replicas must be at least 1, got {self.replicas}")
        self.state_dir = Path(self.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.token_file = self.state_dir / "token"
        self.token = load_or_create_token(self.token_file)
        self.checkpoint_dir = self.state_dir / "checkpoints"
        self.address = f"127.0.0.1:{self.rendezvous_port or free_port()}"

    def url(self, replica: int = 0) -> str:
        return f"http://{self.host}:{self.port + replica}"

    def session(self, replica: int) -> LocalSession:
        return LocalSession(
            model=self.model,
            state_dir=self.state_dir / "replicas" / str(replica),
            shared_dir=self.state_dir,
            port=self.port + replica,
            metrics_port=self.metrics_port + replica,
            metrics_host=self.metrics_host,
            vllm_args=list(self.vllm_args),
            config=self.config,
            log_to_files=self.log_to_files,
            host=self.host,
            restart_policy=self.restart_policy,
            extra_env={
                defaults.ENV_REPLICA: str(replica),
                defaults.ENV_RENDEZVOUS: self.address,
                "HOGWILD_GROUP_SETTLE_S": str(self.settle_s),
            },
        )

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        # Imported here: torch.distributed takes seconds, and a lone session never needs it.
        from hogwild.worker.group.rendezvous import host_store

        self._store = host_store(self.address)
        self.scale(self.replicas)

    def start_replica(self, replica: int) -> LocalSession:
        session = self.session(replica)
        session.start()
        self.sessions[replica] = session
        return session

    def stop_replica(self, replica: int) -> None:
        """The worker first (it leaves the group, and checkpoints if anything is unsaved), vLLM last."""
        session = self.sessions.pop(replica, None)
        if session is not None:
            session.stop()

    def scale(self, replicas: int) -> None:
        """Add replicas up to `replicas` (they join the group and receive its weights) or stop the highest."""
        if replicas < 1:
            raise LocalModeError(f"a session keeps at least one replica, got {replicas}")
        for replica in range(replicas):
            if replica not in self.sessions:
                self.start_replica(replica)
        for replica in sorted(self.sessions, reverse=True):
            if replica >= replicas:
                self.stop_replica(replica)
        self.replicas = replicas

    def wait_ready(self, timeout_s: float = 300.0) -> list[dict[str, Any]]:
        """Until every replica serves, has mapped its weights, and the group has formed with all of them."""
        deadline = time.monotonic() + timeout_s
        ready = [s.wait_ready(max(1.0, deadline - time.monotonic())) for s in self.sessions.values()]
        members = sorted(self.sessions)
        while time.monotonic() < deadline:
            groups = [self.train_status(r).get("group") or {} for r in members]
            if all(g.get("state") == "formed" and g.get("members") == members for g in groups):
                return ready
            time.sleep(0.5)
        raise LocalModeError(f"the replica group did not form with {members} in {timeout_s:.0f} s")

    def train_status(self, replica: int) -> dict[str, Any]:
        from hogwild.local.session import http_json

        try:
            status, body = http_json("GET", f"{self.url(replica)}/train/status", timeout_s=5.0)
        except OSError:
            return {}
        return body if status == 200 else {}

    def supervise(self, out: IO[str] = sys.stdout) -> None:
        """One look at every replica: a dead worker is restarted by its session; a replica whose vLLM exited is
        restarted whole, after the policy's backoff, while the others keep serving."""
        now = time.monotonic()
        for replica, session in list(self.sessions.items()):
            vllm = session.processes.get("vllm")
            if vllm is not None and vllm.poll() is None:
                session.supervise(out)
                continue
            if replica not in self._restart_at:
                history = self._restarts.setdefault(replica, [])
                delay = self.restart_policy.next_delay(history, now)
                if delay is None:
                    raise LocalModeError(
                        f"replica {replica}'s vLLM exited and reached the restart limit; the others serve on"
                    )
                print(
                    f"hogwild: replica {replica}'s vLLM exited; the other replicas keep serving; restarting it "
                    f"in {delay:g} s",
                    file=out,
                    flush=True,
                )
                session.stop_process("worker")
                self._restart_at[replica] = now + delay
            if now >= self._restart_at[replica]:
                del self._restart_at[replica]
                self._restarts[replica].append(now)
                self.stop_replica(replica)
                self.start_replica(replica)
                print(
                    f"hogwild: replica {replica} restarted; it receives the group's weights",
                    file=out,
                    flush=True,
                )

    def stop(self) -> None:
        for replica in sorted(self.sessions, reverse=True):
            self.stop_replica(replica)
        self._store = None  # the store's listener closes with its last reference

    def __enter__(self) -> LocalReplicas:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
