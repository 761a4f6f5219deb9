"""Who is in the group: epochs of membership agreed through torch.distributed's TCPStore.

The store holds a counter `epoch`. To join, a member registers in the current epoch; the first to register
sets the epoch's deadline (now + settle); when it passes, the first member to write `closed` fixes the list,
and every member reads that same list (compare-and-set: one writer wins). Rank = place in the ascending list
of ordinals. A member that finds the current epoch already closed without it asks for the next one (a
compare-and-set of the counter, so racing askers make one new epoch, not several); the members of the
running epoch see the bump at their next exchange and come to the new one.

The store lives in replica 0's worker (in a pod; in `hogwild serve --replicas`, in the serving process). When
it is gone, store calls fail and a member retries with a fresh connection until it is back: training waits,
serving does not.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

from hogwild.worker.group import plan

log = logging.getLogger("hogwild.worker")
EPOCH_KEY = "epoch"


@dataclass(frozen=True)
class Membership:
    epoch: int
    members: tuple[int, ...]  # ordinals, ascending
    replica: int

    @property
    def rank(self) -> int:
        return self.members.index(self.replica)

    @property
    def size(self) -> int:
        return len(self.members)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"rendezvous address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def host_store(address: str, timeout_s: float = 30.0) -> dist.TCPStore:
    """Listen as the group's store (replica 0's worker, or local mode's serving process)."""
    _, port = split_address(address)
    store = dist.TCPStore(
        "0.0.0.0",
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    store.compare_set(EPOCH_KEY, "", "1")
    return store


class Rendezvous:
    def __init__(
        self,
        address: str,
        replica: int,
        *,
        settle_s: float = 2.0,
        store_timeout_s: float = 30.0,
        stopping: threading.Event | None = None,
    ) -> None:
        self.address, self.replica, self.settle_s = address, replica, settle_s
        self.store_timeout_s = store_timeout_s
        self.stopping = stopping or threading.Event()
        self._store: dist.TCPStore | None = None

    @property
    def store(self) -> dist.TCPStore:
        """A client connection to the store (made on first use, and again after a failure)."""
        if self._store is None:
            host, port = split_address(self.address)
            self._store = dist.TCPStore(
                host,
                port,
                is_master=False,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=self.store_timeout_s),
            )
        return self._store

    def forget_store(self) -> None:
        self._store = None

    def epoch(self) -> int:
        """The newest epoch in the store (a cheap read; members call it before every exchange)."""
        return int(self.store.get(EPOCH_KEY))

    def ask_new_epoch(self, after: int) -> None:
        """Move the counter past `after`, once however many members ask at the same moment."""
        self.store.compare_set(EPOCH_KEY, str(after), str(after + 1))

    def join(self) -> Membership:
        """Register, wait for the epoch to close, and return the membership this member is in.

        Retries through store failures (the store's host restarting) with a short backoff; returns None-free:
        it only returns a membership that includes this member. Raises InterruptedError when stopping."""
        while not self.stopping.is_set():
            try:
                joined = self._try_join()
            except (RuntimeError, ValueError) as err:  # store gone or timed out: connect again
                log.warning("rendezvous store unreachable: %s", err, extra={"event": "rendezvous_retry"})
                self.forget_store()
                self.stopping.wait(1.0)
                continue
            if joined is not None:
                return joined
        raise InterruptedError("stopping")

    def _try_join(self) -> Membership | None:
        store, epoch = self.store, self.epoch()
        key = f"epoch/{epoch}"
        if store.check([f"{key}/closed"]):
            self.ask_new_epoch(epoch)
            return None
        slot = store.add(f"{key}/count", 1)
        store.set(f"{key}/slot/{slot}", str(self.replica))
        deadline = float(store.compare_set(f"{key}/deadline", "", repr(time.time() + self.settle_s)))
        while time.time() < deadline and not self.stopping.is_set():
            time.sleep(min(0.1, max(0.0, deadline - time.time())))
        if self.stopping.is_set():
            raise InterruptedError("stopping")
        if not store.check([f"{key}/closed"]):
            count = int(store.add(f"{key}/count", 0))
            seen = [int(store.get(f"{key}/slot/{n}")) for n in range(1, count + 1)]
            with contextlib.suppress(RuntimeError):
                store.compare_set(f"{key}/closed", "", json.dumps(plan.members_of(seen)))
        members = tuple(json.loads(store.get(f"{key}/closed")))
        if self.replica not in members:
            log.info(
                "epoch %d closed without this replica; asking for the next",
                epoch,
                extra={"event": "rendezvous_late", "epoch": epoch},
            )
            self.ask_new_epoch(epoch)
            return None
        return Membership(epoch, members, self.replica)
