"""Says in every OpenAI response which weight version produced it (hogwild.versions).

The worker writes the current version to `<run dir>/weights-version` after every change of the weights; this
middleware reads it (a few bytes from a memory-backed file) at three moments of a serving request:

    x-hogwild-weights-version-first   response header: the version when the request arrived (before its
                                      first token is computed)
    x-hogwild-weights-version         response header: the version when the response starts; for a streamed
                                      response that is before its first token, for a whole one after its last
    : x-hogwild-weights-version-last <v>   streamed responses (text/event-stream) only: an SSE comment, the
                                      last event, with the version when the last token was sent (clients
                                      skip SSE comments; it follows `data: [DONE]`)

The weights may change while a request runs (HOGWILD: updates are live), so a response whose versions
differ was produced by more than one version. Before the worker has mapped the weights the file holds the
version the plugin wrote at start-up (a fresh lineage at the served checkpoint's step).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from hogwild import versions
from hogwild.vllm_plugin.in_flight import SERVING_PREFIXES

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]
UNKNOWN = "unknown"


def read_version(path: Path) -> str:
    try:
        return path.read_text().strip() or UNKNOWN
    except OSError:
        return UNKNOWN


def write_start_version(run_dir: Path, step: int) -> str:
    """At vLLM start-up, before any worker maps the new weights: a fresh lineage at the served step."""
    version = str(versions.Version(versions.new_lineage(), step))
    target = run_dir / versions.VERSION_FILE
    tmp = target.with_name(f".tmp-{versions.VERSION_FILE}-api")
    tmp.write_text(version)
    tmp.replace(target)
    return version


class WeightsVersionMiddleware:
    """`on_version` (if given) hears of a version other than the last one it heard of, before the request
    that saw it goes on: the plugin drops cached prefixes there when the weights changed without a /train of
    this server (another replica's request, or a replica group handing this one its weights)."""

    def __init__(
        self, app: ASGIApp, path: Path, on_version: Callable[[str], Awaitable[None]] | None = None
    ) -> None:
        self.app = app
        self.path = path
        self.on_version = on_version
        self._heard = ""

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not str(scope.get("path", "")).startswith(SERVING_PREFIXES):
            await self.app(scope, receive, send)
            return
        first = read_version(self.path)
        if self.on_version is not None and first != self._heard:
            self._heard = first
            await self.on_version(first)
        streaming = False

        async def send_with_version(message: MutableMapping[str, Any]) -> None:
            nonlocal streaming
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                streaming = any(
                    k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers
                )
                headers.append((versions.HEADER.encode(), read_version(self.path).encode()))
                headers.append((versions.FIRST_HEADER.encode(), first.encode()))
                message["headers"] = headers
            elif message["type"] == "http.response.body" and streaming and not message.get("more_body"):
                last = f"{versions.STREAM_COMMENT_PREFIX}{read_version(self.path)}\n\n".encode()
                await send({"type": "http.response.body", "body": last, "more_body": True})
            await send(message)

        await self.app(scope, receive, send_with_version)
