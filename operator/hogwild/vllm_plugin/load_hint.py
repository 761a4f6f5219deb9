"""Tells the training worker, through the shared load-hint file, how many serving requests are in flight.

The worker's serving protection (`hogwild.worker.protection`) launches no training work while this count is
above zero, so serving steps do not queue behind training kernels. This middleware is the writer: it counts
OpenAI-API requests from arrival until their response (streamed or not) has been sent. Training routes are
not counted: they are the trainer's own work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]
SERVING_PREFIXES = ("/v1/", "/v2/", "/generate", "/tokenize", "/pooling", "/classify", "/score", "/rerank")


class Counter:
    """What the middleware needs from `LoadHint`: the current count and a way to publish a new one."""

    active: int

    def set(self, active: int) -> None: ...


class ServingLoadMiddleware:
    def __init__(self, app: ASGIApp, hint: Counter) -> None:
        self.app = app
        self.hint = hint

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not str(scope.get("path", "")).startswith(SERVING_PREFIXES):
            await self.app(scope, receive, send)
            return
        # One event loop, no await between read and write: the count cannot race.
        self.hint.set(self.hint.active + 1)
        try:
            await self.app(scope, receive, send)
        finally:
            self.hint.set(max(0, self.hint.active - 1))
