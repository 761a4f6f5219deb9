"""Counts the serving requests in flight and tells the training worker, through the load-hint file.

The worker's serving protection (`hogwild.worker.protection`) holds training work while this count is above
zero (within its `min_training_share`), so serving steps do not queue behind training kernels. This
middleware counts OpenAI-API requests from arrival until their response (streamed or not) has been sent;
training routes are not counted (they are the trainer's own work). The file's format and writer are the
contract module `hogwild.load_hint`: the plugin never imports the worker.

While any request is in flight, a heartbeat task on the event loop rewrites the count every `HEARTBEAT_S`.
The reader treats a "busy" hint that has not changed for 10 s as left by a dead writer (and trains again),
so without the heartbeat a generation longer than that would lose its protection halfway. A blocked event
loop stops the heartbeat too, which is the same "the server is not answering" case.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]
SERVING_PREFIXES = ("/v1/", "/v2/", "/generate", "/tokenize", "/pooling", "/classify", "/score", "/rerank")
HEARTBEAT_S = 1.0  # well under the reader's staleness limit (hogwild.load_hint.HINT_STALE_S, 10 s)


class Counter:
    """What the middleware needs from `LoadHint`: the current count and a way to publish a new one."""

    active: int

    def set(self, active: int) -> None: ...


class ServingLoadMiddleware:
    def __init__(self, app: ASGIApp, hint: Counter, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.app = app
        self.hint = hint
        self.heartbeat_s = heartbeat_s
        self._heartbeat: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not str(scope.get("path", "")).startswith(SERVING_PREFIXES):
            await self.app(scope, receive, send)
            return
        # One event loop, no await between read and write: the count cannot race.
        self.hint.set(self.hint.active + 1)
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        try:
            await self.app(scope, receive, send)
        finally:
            self.hint.set(max(0, self.hint.active - 1))
            if self.hint.active == 0 and self._heartbeat is not None:
                self._heartbeat.cancel()
                self._heartbeat = None

    async def _beat(self) -> None:
        """Rewrite the unchanged count, so that the reader sees a live writer during long requests."""
        with contextlib.suppress(asyncio.CancelledError):
            while self.hint.active > 0:
                await asyncio.sleep(self.heartbeat_s)
                if self.hint.active > 0:
                    self.hint.set(self.hint.active)
