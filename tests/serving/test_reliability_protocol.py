"""No message takes the worker down: a table of malformed, truncated, oversized, deeply nested, wrongly typed
and wrongly kinded ZMQ messages, each answered with an error reply, the worker still live afterwards and the
served weights bit for bit what they were. Also: sequences longer than the model's positions, owner-only
files, and a client that notices a worker dying under its request.

Real: a stand-in exporter process holding the tiny model's weights in shared memory, a `hogwild worker`
process mapping them, plain DEALER sockets and the async client the router uses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from hogwild import defaults, handles, protocol, sharing
from hogwild.client import DEAD_AFTER_S, WorkerClient, liveness_verdict
from hogwild.protocol import ProtocolError, StatusRequest, TrainRequest
from hogwild.testing.exporter import ExporterProcess
from hogwild.testing.worker_process import WorkerProcess
from worker_helpers import FACT, Pod, pod_of

NEST = 100_000
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def shared(exporter: ExporterProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    for pod in pod_of(exporter, tmp_path_factory.mktemp("reliability")):
        pod.worker(config={"lr": 1e-3}).wait_connected()
        yield pod


@pytest.fixture
def worker(shared: Pod) -> WorkerProcess:
    return shared.workers[0]


def weights_digest(run_dir: Path) -> str:
    """sha256 over every mapped weight tensor, in name order: what vLLM would serve."""
    manifest = handles.read_manifest(run_dir)
    assert manifest is not None
    digest = hashlib.sha256()
    for name, tensor in sorted(sharing.map_tensors(manifest).items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def send_frames(address: str, frames: list[bytes], wait_s: float = 60.0) -> bytes | None:
    """Send one multipart message as a DEALER; the last frame of the reply, or None if none came."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        if not sock.poll(int(wait_s * 1000)):
            return None
        return sock.recv_multipart()[-1]
    finally:
        sock.close(linger=0)


def msg(**fields: Any) -> bytes:
    return json.dumps({"v": 1, "id": "fuzz", **fields}).encode()


def text_frame(size: int) -> bytes:
    head, tail = b'{"v":1,"type":"train","id":"big","samples":[{"text":"', b'"}]}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


ONE = [{"text": "x"}]
FUZZ: dict[str, tuple[list[bytes], str]] = {
    # not JSON at all, or cut short
    "empty frame": ([b"", b""], "bad_request"),
    "not utf-8": ([b"", b"\xff\xfe\x00\x01"], "bad_request"),
    "truncated": ([b"", b'{"v": 1, "type": "train", "id": "t", "samples": [{"text": "ab'], "bad_request"),
    "json but not an object": ([b"", b"[1, 2]"], "bad_request"),
    # deeply nested: Python's parser gives up with RecursionError
    "100k open brackets": ([b"", b"[" * NEST], "bad_request"),
    "100k nested arrays": ([b"", b"[" * NEST + b"]" * NEST], "bad_request"),
    "100k nested objects": ([b"", b'{"a":' * NEST + b"1" + b"}" * NEST], "bad_request"),
    "nested in the id": ([b"", b'{"v":1,"type":"status","id":' + b"[" * NEST + b"]" * NEST + b"}"], "bad_request"),
    "nested in samples": ([b"", b'{"v":1,"type":"train","id":"n","samples":' + b"[" * NEST + b"]" * NEST + b"}"], "bad_request"),
    "integer of 100k digits": ([b"", b'{"v":1,"type":"train","id":"d","steps":' + b"9" * NEST + b"}"], "bad_request"),
    # wrong types in the envelope
    "id a number": ([b"", json.dumps({"v": 1, "type": "status", "id": 7}).encode()], "bad_request"),
    "id too long": ([b"", json.dumps({"v": 1, "type": "status", "id": "x" * 65}).encode()], "bad_request"),
    "version a string": ([b"", json.dumps({"v": "1", "type": "status", "id": "s"}).encode()], "unsupported_version"),
    "type a list": ([b"", msg(type=["train"])], "unknown_type"),
    "type a number": ([b"", msg(type=1)], "unknown_type"),
    # wrong message kinds
    "a reply sent as a request": ([b"", json.dumps({"v": 1, "id": "r", "ok": True}).encode()], "unknown_type"),
    "an error reply sent as a request": ([b"", protocol.encode_error("e", ProtocolError("busy", "b"))], "unknown_type"),
    "dunder type": ([b"", msg(type="__class__")], "unknown_type"),
    "status with a field": ([b"", msg(type="status", samples=ONE)], "invalid"),
    # wrong types in the fields
    "steps a string": ([b"", msg(type="train", samples=ONE, steps="3")], "invalid"),
    "steps true": ([b"", msg(type="train", samples=ONE, steps=True)], "invalid"),
    "steps past the limit": ([b"", msg(type="train", samples=ONE, steps=10_001)], "invalid"),
    "timeout NaN": ([b"", msg(type="train", samples=ONE, timeout_s=float("nan"))], "invalid"),
    "samples an object": ([b"", msg(type="train", samples={"text": "x"})], "invalid"),
    "sample text an object": ([b"", msg(type="train", samples=[{"text": {"a": 1}}])], "invalid"),
    "input_ids nested": ([b"", msg(type="train", samples=[{"input_ids": [[1, 2]]}])], "invalid"),
    "input_ids negative": ([b"", msg(type="train", samples=[{"input_ids": [-1, 2]}])], "invalid"),
    "input_ids past the vocabulary": ([b"", msg(type="train", samples=[{"input_ids": [1, 10**12]}])], "invalid"),
    "labels of another length": ([b"", msg(type="train", samples=[{"input_ids": [1, 2], "labels": [1]}])], "invalid"),
    "a role that is no role": ([b"", msg(type="train", samples=[{"messages": [{"role": "root", "content": "x"}]}])], "invalid"),
    "changes a list": ([b"", msg(type="configure", changes=[["lr", 1]])], "invalid"),
    "lr infinite": ([b"", msg(type="configure", changes={"lr": float("inf")})], "invalid"),
    "lr a string": ([b"", msg(type="configure", changes={"lr": "1e-3"})], "invalid"),
    "unknown hyperparameter": ([b"", msg(type="configure", changes={"learning_rate": 1})], "invalid"),
    "restore step a string": ([b"", msg(type="restore", step="1")], "invalid"),
    "restore nothing": ([b"", msg(type="restore", weights=False, optimizer=False)], "invalid"),
    "checkpoint reason too long": ([b"", msg(type="checkpoint", reason="r" * 1000)], "invalid"),
    "rollback to a list": ([b"", msg(type="rollback", to=[1])], "invalid"),
    "rollback without a target": ([b"", msg(type="rollback")], "invalid"),
    "rollback to a nested version": ([b"", b'{"v":1,"type":"rollback","id":"r","to":' + b"[" * NEST + b"]" * NEST + b"}"], "bad_request"),
    "eval samples an object": ([b"", msg(type="configure", eval_samples={"text": "a"})], "invalid"),
    # too big
    "too many samples": ([b"", msg(type="train", samples=ONE * 1025)], "too_large"),
    "9 MiB frame": ([b"", text_frame(9 * MIB)], "too_large"),
    "20 MiB frame": ([b"", text_frame(20 * MIB)], "too_large"),
    # multipart oddities
    "no delimiter frame": ([msg(type="reboot")], "unknown_type"),
    "garbage after a good frame": ([b"", msg(type="status"), b"\x00junk"], "bad_request"),
    "five empty frames": ([b""] * 5, "bad_request"),
}  # fmt: skip


@pytest.mark.parametrize(("frames", "code"), FUZZ.values(), ids=FUZZ.keys())
def test_a_malformed_message_gets_an_error_reply_and_changes_nothing(
    worker: WorkerProcess, frames: list[bytes], code: str
) -> None:
    before = weights_digest(worker.run_dir)
    reply = send_frames(worker.address, frames)
    assert reply is not None, f"no reply; worker log:\n{worker.log_tail()}"
    answer = json.loads(reply)
    assert (answer["ok"], answer["error"]["code"]) == (False, code), answer
    assert answer["error"]["message"]
    assert worker.proc.poll() is None, worker.log_tail()
    assert worker.call("status", wait_s=30)["connected"] is True
    assert weights_digest(worker.run_dir) == before


DEEP = {
    "open brackets": b"[" * NEST,
    "nested arrays": b"[" * NEST + b"]" * NEST,
    "nested in the id": b'{"v":1,"id":' + b"[" * NEST + b"]" * NEST + b"}",
}


@pytest.mark.parametrize("frame", DEEP.values(), ids=DEEP.keys())
def test_deep_nesting_is_a_protocol_error_not_a_recursion_error(frame: bytes) -> None:
    assert protocol.request_id_of(frame) == ""
    with pytest.raises(ProtocolError) as err:
        protocol.decode_request(frame)
    assert err.value.code == "bad_request" and "nest" in err.value.message
    with pytest.raises(ProtocolError):
        protocol.decode_reply(frame)


# ---- sequences longer than the model's positions ---------------------------------------------------------
POSITIONS = 512  # TinySpec().max_positions
LONG = {
    "576 token ids": ([{"input_ids": [7] * 576}], 576 - POSITIONS),
    "512 token ids fit": ([{"input_ids": [7] * 512}], 0),
    "two samples past the positions": ([{"input_ids": [7] * 600}] * 2, 2 * (600 - POSITIONS)),
    "text of ~2800 tokens": ([{"text": "the cat sees a red house. " * 400}], None),
    "2 MiB of text": ([{"text": "the cat sees a red house. " * (2 * MIB // 26)}], None),
}


@pytest.mark.parametrize(("samples", "cut"), LONG.values(), ids=LONG.keys())
def test_positions_the_model_lacks_are_cut_and_reported(
    worker: WorkerProcess, samples: list[dict[str, Any]], cut: int | None
) -> None:
    reply = worker.call("train", wait_s=300, samples=samples, steps=1)
    assert reply["steps"] == 1
    assert reply["tokens"] <= POSITIONS * len(samples)
    if cut is None:
        assert reply["truncated_tokens"] > 0
    else:
        assert reply["truncated_tokens"] == cut


# ---- files that hold weights are the owner's only ------------------------------------------------------
def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_shared_weights_file_is_owner_only(exporter: ExporterProcess) -> None:
    manifest = handles.read_manifest(exporter.run_dir)
    assert manifest is not None
    assert mode(Path(manifest.payload)) == 0o600


def test_every_checkpoint_file_is_owner_only(worker: WorkerProcess) -> None:
    saved = worker.call("checkpoint", wait_s=120)
    files = {p.name: oct(mode(p)) for p in Path(saved["path"]).iterdir()}
    assert "optimizer.pt" in files and "meta.json" in files
    assert {name: m for name, m in files.items() if m != oct(0o600)} == {}


# ---- the router's client notices a dead or restarted worker ---------------------------------------------
async def train_until_the_worker_dies(pod: Pod, restart: bool) -> tuple[ProtocolError, float]:
    client = WorkerClient(pod.workers[0].address)
    try:
        baseline = await client.request(StatusRequest(), timeout_s=30)
        train = TrainRequest.from_body({"samples": [FACT], "steps": 10_000})
        task = asyncio.ensure_future(client.request_watched(train, timeout_s=600, baseline=baseline))
        started = time.monotonic()
        while pod.workers[0].proc.poll() is None:  # the fault point kills it after its 3rd step
            await asyncio.sleep(0.1)
            assert time.monotonic() - started < 120, "the fault point never fired"
        died = time.monotonic()
        if restart:
            pod.worker()
        with pytest.raises(ProtocolError) as err:
            await task
        return err.value, time.monotonic() - died
    finally:
        await client.close()


@pytest.mark.parametrize("restart", [False, True], ids=["worker-stays-dead", "worker-restarts"])
def test_a_request_in_flight_fails_fast_when_the_worker_dies(pod: Pod, restart: bool) -> None:
    pod.worker(config={"lr": 1e-3}, env={defaults.ENV_FAULT: "train.after_step:3"}).wait_connected()
    error, waited_s = asyncio.run(train_until_the_worker_dies(pod, restart))
    assert error.code == "not_connected" and error.status == 503
    assert "worker" in error.message and "step" in error.message
    assert waited_s < 30, f"noticed only after {waited_s:.0f} s"


# ---- pure pieces: what the heartbeat concludes, what the router sends --------------------------------------
BASE = {"incarnation": "a1", "step": 7}
VERDICTS = {
    "same worker answers": ("train", {"incarnation": "a1", "step": 9}, 0.0, None),
    "same worker, long silence before": ("train", {"incarnation": "a1"}, 60.0, None),
    "no answer yet, briefly": ("train", None, 3.0, None),
    "another worker answers": ("train", {"incarnation": "b2", "step": 5}, 0.0, "restarted"),
    "silent too long": ("train", None, DEAD_AFTER_S, "stopped answering"),
    "checkpoint: previous one untouched": (
        "checkpoint",
        None,
        DEAD_AFTER_S + 1,
        "previous complete checkpoint",
    ),
    "train: says the step it started at": ("train", {"incarnation": "b2"}, 0.0, "at step 7"),
    "train: counts the steps surely applied": (
        "train",
        None,
        DEAD_AFTER_S,
        "at least 3 of this request's steps",
    ),
}
LAST = {"incarnation": "a1", "step": 10}


@pytest.mark.parametrize(("kind", "seen", "silent_s", "needle"), VERDICTS.values(), ids=VERDICTS.keys())
def test_the_heartbeat_verdict(
    kind: str, seen: dict[str, Any] | None, silent_s: float, needle: str | None
) -> None:
    verdict = liveness_verdict(kind, BASE, seen, silent_s, LAST)
    if needle is None:
        assert verdict is None
    else:
        assert verdict is not None and needle in verdict


def test_a_body_within_the_http_limit_stays_within_the_frame_limit() -> None:
    """Multi-byte text as \\uXXXX escapes would triple in size and be dropped on its way to the worker."""
    text = "é" * ((defaults.MAX_TRAIN_BODY_BYTES - 100) // 2)
    frame = protocol.encode_request(TrainRequest.from_body({"samples": [{"text": text}]}))
    assert len(frame) <= protocol.MAX_FRAME_BYTES
    assert protocol.decode_request(frame)[1].samples[0].text == text


def test_a_lone_surrogate_is_an_invalid_sample() -> None:
    with pytest.raises(ProtocolError) as err:
        TrainRequest.from_body(json.loads('{"samples": [{"text": "\\ud800"}]}'))
    assert err.value.code == "invalid"


HUGE_VALUES = {
    "steps a million-entry list": ("train", {"samples": [{"text": "a"}], "steps": [0] * 1_000_000}),
    "lr of 5 MB": ("configure", {"changes": {"lr": "x" * 5_000_000}}),
    "an unknown key of 3 MB": ("train", {"samples": [{"text": "a"}], "x" * 3_000_000: 1}),
    "step nested 900 deep": ("restore", {"step": json.loads("[" * 900 + "]" * 900)}),
}


@pytest.mark.parametrize(("kind", "body"), HUGE_VALUES.values(), ids=HUGE_VALUES.keys())
def test_an_error_message_stays_short_whatever_it_quotes(kind: str, body: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as err:
        protocol.REQUEST_TYPES[kind].from_body(body)
    assert err.value.code == "invalid" and 0 < len(err.value.message) <= 1100
