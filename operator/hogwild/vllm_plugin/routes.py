"""Training routes on vLLM's serving port. Thin: authenticate, validate, forward to the worker over async ZMQ.

    POST /train           train on samples; blocks until the steps finish; answers step, loss, tokens
    POST /checkpoint      write a checkpoint now
    POST /train/restore   roll weights and optimizer state back to a checkpoint (newest by default)
    POST /train/rollback  put weights and optimizer state back to a kept version: {"to": "previous" |
                          "<lineage>.<step>" | <checkpoint step>}; answers what was restored and how long it took
    POST /train/configure change hyperparameters at runtime (same fields as the CR's hot fields) and the
                          evaluation gate's held-out set (`eval_samples`)
    GET  /train/status    the worker's status (no token: it changes nothing)

Every error is JSON `{"error": {"code", "message"}}` with docs/design.md's status codes. Nothing here blocks the
event loop: the worker does the work in its own process, and we only await a socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from hogwild import defaults
from hogwild.auth import bearer_ok
from hogwild.client import WorkerClient
from hogwild.protocol import (
    Answered,
    CheckpointRequest,
    ConfigureRequest,
    ProtocolError,
    Reply,
    RestoreRequest,
    RollbackRequest,
    StatusReply,
    StatusRequest,
    TrainRequest,
    parse_json,
)
from hogwild.vllm_plugin import compat
from hogwild.vllm_plugin.versions import UNKNOWN

log = logging.getLogger("hogwild.routes")

# How long we wait for the worker to answer a liveness probe before a train request: a dead worker gives a
# quick 503 instead of a long 504.
PROBE_TIMEOUT_S = 3.0
PREFIX_RESET_ATTEMPTS = 20
PREFIX_RESET_PAUSE_S = 0.05


def prefix_cache_policy(status: StatusReply) -> str:
    """What to do with cached prefixes once the weights changed: the worker's `prefix_cache` setting."""
    return str(status.get("config", {}).get("prefix_cache", "reset"))


def error_response(error: ProtocolError) -> JSONResponse:
    return JSONResponse({"error": {"code": error.code, "message": error.message}}, status_code=error.status)


class TrainingRoutes:
    """State shared by the routes of one API server: the worker client, the token, the one-train lock."""

    def __init__(self, client: WorkerClient, token: str, engine_client: Any) -> None:
        self.client = client
        self.token = token
        self.engine_client = engine_client
        self.train_lock = asyncio.Lock()
        self.prefix_cache_resets = 0
        self.prefix_cache_reset_failures = 0
        self.reported_gpu_wait_error = ""
        self.last_policy = ""  # the worker's prefix_cache setting, as the last status said

    # ---- helpers ------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if not bearer_ok(request.headers.get("authorization"), self.token):
            raise ProtocolError(
                "unauthorized", "missing or wrong token: send 'Authorization: Bearer <token>'"
            )

    async def json_body(self, request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > defaults.MAX_TRAIN_BODY_BYTES:
            raise ProtocolError("too_large", f"body over {defaults.MAX_TRAIN_BODY_BYTES} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw.extend(chunk)
            if len(raw) > defaults.MAX_TRAIN_BODY_BYTES:
                raise ProtocolError("too_large", f"body over {defaults.MAX_TRAIN_BODY_BYTES} bytes")
        if not raw.strip():
            return {}
        body = parse_json(raw, "body")  # 400 for what cannot be parsed, deep nesting included
        if not isinstance(body, dict):
            raise ProtocolError("invalid", "body must be a JSON object")
        return body

    async def probe(self) -> StatusReply:
        try:
            status = await self.client.request(StatusRequest(), timeout_s=PROBE_TIMEOUT_S)
        except ProtocolError as err:
            if err.code == "timeout":
                raise ProtocolError("not_connected", "the training worker is not reachable") from None
            raise
        self.note_protection(status)
        self.last_policy = prefix_cache_policy(status)
        return status

    def note_protection(self, status: StatusReply) -> None:
        """Repeat in vLLM's log, once per cause, that the worker's serving protection fell back to the host
        (whoever reads the server's log is the one whose latency it concerns)."""
        error = str((status.get("protection") or {}).get("gpu_wait_error") or "")
        if error and error != self.reported_gpu_wait_error:
            self.reported_gpu_wait_error = error
            log.warning(
                "hogwild: the worker's serving protection waits on the host, not in the GPU (%s)", error
            )

    async def drop_stale_prefixes(self, policy: str, attempts: int = PREFIX_RESET_ATTEMPTS) -> bool:
        """After the weights changed, drop KV blocks computed with the old ones (policy "reset")."""
        if policy != "reset":
            return False
        for attempt in range(attempts):
            if await compat.reset_prefix_cache(self.engine_client):
                self.prefix_cache_resets += 1
                return True
            if attempt + 1 < attempts:  # blocks in use by running requests cannot be freed yet: try again
                await asyncio.sleep(PREFIX_RESET_PAUSE_S)
        self.prefix_cache_reset_failures += 1
        if attempts > 1:
            log.warning("hogwild: prefix cache still in use after training; stale prefixes may be served")
        return False

    async def weights_changed_elsewhere(self, version: str) -> None:
        """A serving request found a new weights version. While a /train of this server runs, its own route
        resets the prefix cache when it ends (as before replicas). Otherwise the change came from elsewhere:
        another replica's request trained these weights too, or the replica group handed this replica its
        weights. Then drop prefixes now, before this request reads them (the worker's policy, as /train)."""
        if self.train_lock.locked() or version == UNKNOWN:
            return
        # One attempt: a serving request is waiting on it. Blocks in use now are retried at the next change.
        await self.drop_stale_prefixes(self.last_policy or "reset", attempts=1)

    # ---- routes -------------------------------------------------------------------------------------
    async def train(self, request: Request) -> JSONResponse:
        self.authorize(request)
        train = TrainRequest.from_body(await self.json_body(request))
        if self.train_lock.locked():
            raise ProtocolError("busy", "a training request is already running; retry when it finishes")
        async with self.train_lock:
            status = await self.probe()
            if not status.get("connected"):
                raise ProtocolError("not_connected", "the training worker has not mapped the weights yet")
            started = time.monotonic()
            # Watched: a worker that dies or restarts under this request fails it in seconds (503), and the
            # lock is free again for the next one.
            reply = await self.client.request_watched(train, train.timeout_s + 5.0, baseline=status)
            reset = await self.drop_stale_prefixes(prefix_cache_policy(status))
            return JSONResponse(
                {**reply, "prefix_cache_reset": reset, "seconds": round(time.monotonic() - started, 3)}
            )

    async def rollback(self, request: Request) -> JSONResponse:
        """Like forward, but never beside a train request: a rollback under it gets 409, and a train
        request that arrives during the rollback gets 409 too (the one-train lock is held)."""
        self.authorize(request)
        message = RollbackRequest.from_body(await self.json_body(request))
        if self.train_lock.locked():
            raise ProtocolError("busy", "a training request is running; roll back after it finishes")
        async with self.train_lock:
            return await self.relay(message, changes_weights=True)

    async def forward(
        self,
        request: Request,
        kind: type[CheckpointRequest | RestoreRequest | ConfigureRequest],
        *,
        changes_weights: bool,
    ) -> JSONResponse:
        self.authorize(request)
        return await self.relay(
            kind.from_body(await self.json_body(request)), changes_weights=changes_weights
        )

    async def relay(self, message: Answered[Reply], *, changes_weights: bool) -> JSONResponse:
        status = await self.probe()
        reply = await self.client.request_watched(message, defaults.CONTROL_TIMEOUT_S * 10, baseline=status)
        if not changes_weights:
            return JSONResponse(reply)
        reset = await self.drop_stale_prefixes(prefix_cache_policy(status))
        return JSONResponse({**reply, "prefix_cache_reset": reset})

    async def status(self) -> JSONResponse:
        reply = await self.probe()
        router = {
            "prefix_cache_resets": self.prefix_cache_resets,
            "prefix_cache_reset_failures": self.prefix_cache_reset_failures,
            "train_in_flight": self.train_lock.locked(),
        }
        return JSONResponse({**reply, "router": router})


def attach(app: FastAPI, get_routes: Callable[[], TrainingRoutes | None]) -> None:
    """Register the routes. `get_routes()` returns the TrainingRoutes made in init_state (None before)."""

    async def guarded(handler: Callable[[TrainingRoutes], Awaitable[JSONResponse]]) -> JSONResponse:
        routes = get_routes()
        if routes is None:
            return error_response(ProtocolError("not_connected", "hogwild routes are still starting"))
        try:
            return await handler(routes)
        except ProtocolError as err:
            return error_response(err)
        except Exception as err:  # a bug must still answer JSON, and never take the server down
            log.exception("hogwild route failed")
            return error_response(ProtocolError("internal", f"internal error: {type(err).__name__}: {err}"))

    @app.post("/train")
    async def train(request: Request) -> JSONResponse:
        return await guarded(lambda r: r.train(request))

    @app.post("/checkpoint")
    async def checkpoint(request: Request) -> JSONResponse:
        return await guarded(lambda r: r.forward(request, CheckpointRequest, changes_weights=False))

    @app.post("/train/restore")
    async def restore(request: Request) -> JSONResponse:
        return await guarded(lambda r: r.forward(request, RestoreRequest, changes_weights=True))

    @app.post("/train/rollback")
    async def rollback(request: Request) -> JSONResponse:
        return await guarded(lambda r: r.rollback(request))

    @app.post("/train/configure")
    async def configure(request: Request) -> JSONResponse:
        return await guarded(lambda r: r.forward(request, ConfigureRequest, changes_weights=False))

    @app.get("/train/status")
    async def status() -> JSONResponse:
        return await guarded(lambda r: r.status())
