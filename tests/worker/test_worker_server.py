"""The worker process behind its ZMQ sockets: the protocol's messages, errors, concurrency and CURVE auth.

Real: a worker process (`hogwild worker`) mapping the weights of a stand-in exporter process, its ipc socket
and CURVE-authenticated tcp socket (libzmq's CURVE and a ZAP handler), the protocol module on both sides.
Clients here are plain DEALER sockets, as the router's and operator's are.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hogwild import auth
from hogwild.auth import CurveKeys
from hogwild.defaults import MANIFEST_NAME
from hogwild.protocol import ProtocolError
from hogwild.testing.exporter import ExporterProcess
from hogwild.testing.tiny_model import TinySpec, cached
from hogwild.testing.worker_process import WorkerProcess, call, call_raw
from worker_helpers import ENV, FACT, Pod, pod_of

LONG_TRAIN = {"samples": [FACT], "steps": 10_000}


@pytest.fixture(scope="module")
def curve_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return auth.write_curve_dir(tmp_path_factory.mktemp("curve"))


@pytest.fixture(scope="module")
def shared(
    exporter: ExporterProcess, curve_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pod]:
    """One worker for the tests that leave it as they found it (unpaused, idle)."""
    for pod in pod_of(exporter, tmp_path_factory.mktemp("shared")):
        pod.worker(config={"lr": 1e-3}, curve_dir=curve_dir).wait_connected()
        yield pod


@pytest.fixture
def worker(shared: Pod) -> WorkerProcess:
    worker = shared.workers[0]
    assert worker.call("status")["busy"] is False
    return worker


def error_of(worker: WorkerProcess, kind: str, **fields: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as err:
        worker.call(kind, **fields)
    return err.value


# ---- the messages ----------------------------------------------------------------------------------------
def test_a_worker_started_beside_running_weights_maps_them_at_the_first_try(pod: Pod) -> None:
    """The manifest is there when the worker starts (a restart beside a running vLLM, a replica rejoining): its
    first mapping must not race the thread that pre-imports transformers (it failed, then waited 10 s)."""
    worker = pod.worker()
    worker.wait_connected()
    events = [e.get("event") for e in worker.log_events()]
    assert "map_failed" not in events and events.count("mapped") == 1, events


def test_train_replies_with_step_loss_and_tokens(worker: WorkerProcess) -> None:
    start = worker.call("status")["step"]
    reply = worker.call("train", samples=[FACT], steps=2)
    assert reply["step"] == start + 2 and len(reply["losses"]) == 2 and reply["tokens"] > 0
    status = worker.call("status")
    assert (status["step"], status["loss"], status["busy"]) == (reply["step"], reply["loss"], False)


def test_status_and_checkpoint_answer_while_a_train_runs_and_a_second_train_is_busy(
    worker: WorkerProcess,
) -> None:
    start = worker.call("status")["step"]
    running = worker.post("train", **LONG_TRAIN)
    try:
        status = worker.wait_until(lambda s: s["busy"] and s["step"] > start)
        assert status["connected"] is True
        busy = error_of(worker, "train", samples=[FACT])
        assert (busy.code, busy.status) == ("busy", 409)
        assert error_of(worker, "restore").code == "busy"
        saved = worker.call("checkpoint")  # between two steps: the train goes on after it
        assert saved["step"] > start and worker.call("status")["busy"] is True
        assert worker.call("configure", changes={"paused": True})["config"]["paused"] is True
        reply = running.result()
        assert reply["stopped"] == "paused" and start < reply["step"] < start + LONG_TRAIN["steps"]
    finally:
        worker.call("configure", changes={"paused": False})


def test_a_paused_worker_refuses_to_train(worker: WorkerProcess) -> None:
    worker.call("configure", changes={"paused": True})
    try:
        refused = error_of(worker, "train", samples=[FACT])
        assert refused.code == "busy" and "paused" in refused.message
        assert worker.call("status")["paused"] is True
    finally:
        worker.call("configure", changes={"paused": False})


def test_train_honours_its_timeout(worker: WorkerProcess) -> None:
    error = error_of(worker, "train", samples=[FACT], steps=10_000, timeout_s=0.3)
    assert error.code == "timeout" and "timeout_s=0.3" in error.message  # the worker's answer, not ours
    assert worker.call("status")["busy"] is False


@pytest.mark.parametrize(
    ("changes", "state_reset"),
    [
        pytest.param({"lr": 2e-3, "clip_grad_norm": 0.5}, False, id="hot"),
        pytest.param({"rank": 16}, True, id="rank-resets-state"),
    ],
)
def test_configure_replies_what_it_applied(
    worker: WorkerProcess, changes: dict[str, Any], state_reset: bool
) -> None:
    reply = worker.call("configure", changes=changes)
    assert (reply["applied"], reply["state_reset"]) == (sorted(changes), state_reset)
    assert {k: reply["config"][k] for k in changes} == changes
    assert worker.call("status")["config"] == reply["config"]


def test_checkpoint_then_restore_puts_the_served_weights_back(pod: Pod) -> None:
    worker = pod.worker(config={"lr": 1e-2})
    worker.wait_connected()
    name = "model.layers.0.mlp.gate_up_proj.weight"
    saved = worker.call("checkpoint")
    served = pod.exporter.checksum(name)
    worker.call("train", samples=[FACT], steps=2)
    assert pod.exporter.checksum(name) != served
    reply = worker.call("restore", step=saved["step"])
    assert (reply["step"], reply["path"], reply["weights"], reply["optimizer"]) == (
        saved["step"],
        saved["path"],
        True,
        True,
    )
    assert pod.exporter.checksum(name) == served
    assert error_of(worker, "restore", step=saved["step"] + 99).code == "not_found"


# ---- malformed input never ends the worker ------------------------------------------------------------------
FRAMES = [
    pytest.param(b"\xff\xfe not json", "bad_request", id="not-json"),
    pytest.param(b"[1, 2]", "bad_request", id="not-an-object"),
    pytest.param(b'{"v": 2, "type": "status", "id": "x"}', "unsupported_version", id="future-version"),
    pytest.param(b'{"type": "status", "id": "x"}', "unsupported_version", id="no-version"),
    pytest.param(b'{"v": 1, "type": "reboot", "id": "x"}', "unknown_type", id="unknown-type"),
    pytest.param(b'{"v": 1, "type": "status", "id": "x", "extra": 1}', "invalid", id="unknown-field"),
    pytest.param(b'{"v": 1, "type": "train", "id": "x", "samples": [{"txt": "a"}]}', "invalid", id="bad-sample"),
    pytest.param(b'{"v": 1, "type": "train", "id": "x", "samples": []}', "invalid", id="no-samples"),
    pytest.param(b'{"v": 1, "type": "configure", "id": "x", "changes": {"lr": -1}}', "invalid", id="bad-lr"),
    pytest.param(b'{"v": 1, "type": "train", "id": "x", "samples": [{"input_ids": [1, 99999]}]}', "invalid", id="token-past-vocab"),
]  # fmt: skip


@pytest.mark.parametrize(("frame", "code"), FRAMES)
def test_a_bad_frame_gets_an_error_reply_and_the_worker_lives_on(
    worker: WorkerProcess, frame: bytes, code: str
) -> None:
    reply = call_raw(worker.address, frame, wait_s=30)
    assert reply is not None
    answer = json.loads(reply)
    assert (answer["ok"], answer["error"]["code"]) == (False, code)
    assert worker.call("status")["connected"] is True


def test_extra_frames_are_answered_on_the_same_route(worker: WorkerProcess) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(worker.address)
    try:
        sock.send_multipart([b"a", b"b", b'{"v": 1, "type": "status", "id": "multi"}'])
        assert sock.poll(30_000)
        frames = sock.recv_multipart()
        assert frames[:2] == [b"a", b"b"] and json.loads(frames[-1])["id"] == "multi"
    finally:
        sock.close(linger=0)


# ---- tcp: CURVE, only the operator's key --------------------------------------------------------------------
def tcp_address(worker: WorkerProcess) -> str:
    endpoint = worker.call("status")["control_endpoint"]
    assert endpoint and endpoint.startswith("tcp://")
    return str(endpoint)


def test_the_operator_key_is_served_over_tcp(worker: WorkerProcess, curve_dir: Path) -> None:
    keys = auth.load_curve_keys("client", curve_dir)
    assert call(tcp_address(worker), "status", wait_s=30, curve=keys)["connected"] is True


def test_another_client_key_gets_no_answer(worker: WorkerProcess, curve_dir: Path) -> None:
    server_public = auth.load_curve_keys("client", curve_dir).peer_public
    public, secret = auth.generate_keypair()
    stranger = CurveKeys(public=public, secret=secret, peer_public=server_public)
    with pytest.raises(ProtocolError) as err:
        call(tcp_address(worker), "status", wait_s=2, curve=stranger)
    assert err.value.code == "timeout"


def test_plaintext_on_the_tcp_port_gets_no_answer(worker: WorkerProcess) -> None:
    frame = b'{"v": 1, "type": "status", "id": "plain"}'
    assert call_raw(tcp_address(worker), frame, wait_s=2) is None


# ---- serving protection ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("in_flight", "waited"), [(1, True), (0, False)], ids=["server-busy", "server-idle"])
def test_training_yields_while_the_server_has_requests_in_flight(
    pod: Pod, in_flight: int, waited: bool
) -> None:
    from hogwild.load_hint import HINT_NAME, LoadHint

    hint = LoadHint(pod.run_dir / HINT_NAME)  # what vLLM's side keeps current
    hint.set(in_flight)
    stop = threading.Event()

    # The plugin's heartbeat: a count left unchanged for 10 s reads as a dead writer.
    def heartbeat() -> None:
        while not stop.wait(0.5):
            hint.set(in_flight)

    beat = threading.Thread(target=heartbeat)
    beat.start()
    try:
        worker = pod.worker(config={"protection": {"yield_when_busy": True, "max_wait_s": 0.01}})
        worker.wait_connected()
        worker.call("train", samples=[FACT], steps=2)
        stats = worker.call("status")["protection"]
    finally:
        stop.set()
        beat.join()
        hint.close()
    assert stats["points"] > 0
    assert (stats["waits"] > 0, stats["gave_up"] > 0) == (waited, waited)


# ---- the watcher -----------------------------------------------------------------------------------------
def test_status_and_configure_answer_before_weights_appear(pod: Pod) -> None:
    manifest = pod.run_dir / MANIFEST_NAME
    held_back = pod.run_dir.parent / "held-back.json"
    manifest.rename(held_back)
    worker = pod.worker()
    status = worker.wait_until(lambda s: True)
    assert (status["connected"], status["exporter"]) == (False, None)
    assert worker.call("configure", changes={"lr": 3e-4})["config"]["lr"] == 3e-4
    assert error_of(worker, "train", samples=[FACT]).code == "not_connected"
    held_back.rename(manifest)  # the exporter publishes its weights
    status = worker.wait_connected()
    assert status["exporter"]["nonce"] == pod.exporter.nonce and status["config"]["lr"] == 3e-4


def test_the_worker_follows_the_exporter_through_a_restart(tmp_path: Path) -> None:
    run_dir, model = tmp_path / "run", cached(TinySpec())
    run_dir.mkdir()
    first = ExporterProcess(model, run_dir, env=ENV)
    worker = WorkerProcess(run_dir, tmp_path / "ckpt", env=ENV)
    second = None
    try:
        assert worker.wait_connected()["exporter"]["nonce"] == first.nonce
        first.close()  # vLLM went away: its weights are no longer served
        assert worker.wait_until(lambda s: not s["connected"])["exporter"] is None
        assert error_of(worker, "train", samples=[FACT]).code == "not_connected"
        second = ExporterProcess(model, tmp_path / "run2", env=ENV)
        shutil.copyfile(
            tmp_path / "run2" / MANIFEST_NAME, run_dir / MANIFEST_NAME
        )  # as its restart would write
        worker.wait_until(lambda s: s["connected"] and s["exporter"]["nonce"] == second.nonce)
        assert worker.call("train", samples=[FACT])["step"] == 1
    finally:
        worker.close()
        first.close()
        if second is not None:
            second.close()
