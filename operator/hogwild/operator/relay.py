"""Requests from the operator to a session's training worker: ZMQ over tcp, CURVE-authenticated.

One `WorkerClient` per session replica (each replica's worker is asked on its own), kept while its address and keys stay the same. After a timeout the client
is closed: ZMQ would otherwise keep the unanswered request queued and deliver it, stale, whenever the
worker comes back. Every round trip is timed into the operator's metrics.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from hogwild.auth import CURVE_FILES, CurveKeys
from hogwild.client import WorkerClient
from hogwild.operator.metrics import OperatorMetrics
from hogwild.protocol import Answered, ProtocolError

logger = logging.getLogger(__name__)
ReplyT = TypeVar("ReplyT")


def client_keys(secret: Mapping[str, Any]) -> CurveKeys:
    """The operator's side of a CURVE Secret. Raises ValueError naming what is missing."""
    data = secret.get("data") or {}
    wanted = ("client.public", "client.secret", "server.public")
    missing = [k for k in wanted if k not in data]
    if missing:
        name = secret.get("metadata", {}).get("name", "?")
        raise ValueError(f"Secret {name} lacks {', '.join(missing)} (needs all of {', '.join(CURVE_FILES)})")
    key = {k: base64.b64decode(data[k]).strip() for k in wanted}
    return CurveKeys(
        public=key["client.public"], secret=key["client.secret"], peer_public=key["server.public"]
    )


@dataclass(frozen=True)
class Target:
    namespace: str
    session: str
    address: str
    keys: CurveKeys
    replica: int = 0


class Relay:
    def __init__(self, metrics: OperatorMetrics) -> None:
        self.metrics = metrics
        self._clients: dict[tuple[str, str, int], tuple[Target, WorkerClient]] = {}

    async def _client(self, target: Target) -> WorkerClient:
        key = (target.namespace, target.session, target.replica)
        held = self._clients.get(key)
        if held is not None and held[0] == target:
            return held[1]
        if held is not None:  # a new pod (address) or new keys
            await self.forget(target.namespace, target.session, target.replica)
        client = WorkerClient(target.address, target.keys)
        self._clients[key] = (target, client)
        return client

    async def request(self, target: Target, request: Answered[ReplyT], timeout_s: float) -> ReplyT:
        """The worker's reply fields (hogwild.replies: a TrainRequest's are a TrainReply). Raises
        ProtocolError (its error, or `timeout`)."""
        client = await self._client(target)
        started = time.perf_counter()
        try:
            reply = await client.request(request, timeout_s)
        except ProtocolError as err:
            self.metrics.relay_errors.labels(target.namespace, target.session, request.type, err.code).inc()
            if err.code == "timeout":
                await self.forget(target.namespace, target.session, target.replica)
            logger.info(
                "relay session=%s/%s request=%s address=%s error=%s: %s",
                target.namespace,
                target.session,
                request.type,
                target.address,
                err.code,
                err.message,
            )
            raise
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.relay_seconds.labels(target.namespace, target.session, request.type).observe(elapsed)
        return reply

    async def forget(self, namespace: str, session: str, replica: int | None = None) -> None:
        """Close the client of one replica's worker, or (None) of every replica's."""
        for key in [k for k in self._clients if k[:2] == (namespace, session)]:
            if replica is None or key[2] == replica:
                held = self._clients.pop(key)
                await held[1].close()

    async def close(self) -> None:
        for namespace, session, _ in list(self._clients):
            await self.forget(namespace, session)
