"""What waits in one member for its replica group: train requests, configures, a restore or rollback.

The worker service puts requests here from the socket thread; the group's thread takes them at its exchanges
(hogwild.worker.group.runner). Train and configure requests travel to the other members as protocol bodies;
a restore or rollback does not: it runs here, and the others take its result (hogwild.worker.group.state).
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hogwild.errors import ProtocolError
from hogwild.protocol import Reply

Done = Callable[[Reply | ProtocolError], None]
Item = TypeVar("Item")


@dataclass(frozen=True)
class Job:
    """A train or configure request that came to this member: its protocol body and whom to answer."""

    body: dict[str, Any]
    done: Done


@dataclass(frozen=True)
class Reset:
    """A restore or rollback that came to this member: `run` applies it here, returning (reply, saved)."""

    name: str
    run: Callable[[], tuple[Reply | ProtocolError, bool]]
    done: Done


class Waiting(Generic[Item]):
    """A queue the socket thread fills and the group's thread empties, in order."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Item] = queue.Queue()

    def put(self, item: Item) -> None:
        self._queue.put(item)

    def take(self) -> Item | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def peek(self) -> list[Item]:
        with self._queue.mutex:
            return list(self._queue.queue)

    def empty(self) -> bool:
        return self._queue.empty()

    def drain(self) -> list[Item]:
        taken = []
        while (item := self.take()) is not None:
            taken.append(item)
        return taken


class Inbox:
    def __init__(self) -> None:
        self.trains: Waiting[Job] = Waiting()
        self.configures: Waiting[Job] = Waiting()
        self.resets: Waiting[Reset] = Waiting()

    def fail_all(self, why: str) -> None:
        """Answer everything still waiting (the member leaves the group for good)."""
        waiting: list[Job | Reset] = [*self.trains.drain(), *self.configures.drain(), *self.resets.drain()]
        for item in waiting:
            item.done(ProtocolError("not_connected", why))
