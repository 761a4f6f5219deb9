"""The replica group's decisions, as pure functions of what every member said (no I/O, no torch).

Members exchange one `Control` each at every idle tick and before every step of a shared train request
(hogwild.worker.group.runner). Every member runs the same function over the same list, so all of them decide
the same thing without a leader: which jobs start and in what order, whether the group re-forms, whether a
running request stops, whether the weights are in sync, and which member the others copy when they are not.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class Stop(enum.IntEnum):
    """Why a shared train request ends early; the largest reason any member gives wins."""

    NONE = 0
    PAUSED = 1  # training was paused (a configure reached the group)
    TIMEOUT = 2  # the originating member's deadline passed
    REGROUP = 3  # a member leaves or joins: the group re-forms after this step
    SHUTDOWN = 4  # this member is shutting down


@dataclass(frozen=True)
class Control:
    """What one member tells the others at one exchange. JSON on the wire (`to_wire`/`from_wire`)."""

    replica: int  # the member's ordinal (stable across epochs); its rank is its place in the member list
    phase: str = "tick"  # "tick" (idle) or "step" (before a step of a shared request): all must agree
    epoch_seen: int = 0  # the newest epoch this member saw in the store (a joiner bumps it)
    leaving: bool = False  # this member leaves after this exchange (SIGTERM, re-mapped weights)
    stop: Stop = Stop.NONE
    step: int = 0
    digest: str | None = None  # of the weights after `step` (hogwild.worker.group.digest)
    saved_step: int | None = None  # a checkpoint of this step was just written by this member
    configure: tuple[dict[str, Any], ...] = ()  # protocol bodies of configure requests to apply, in order
    job: dict[str, Any] | None = None  # a train request's protocol body, to start (idle ticks only)
    # A restore or rollback waits in this member (idle ticks only): it runs here, then the others take its
    # weights, optimizer state and version. Only the member that has it needs the request itself.
    reset: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "phase": self.phase,
            "epoch_seen": self.epoch_seen,
            "leaving": self.leaving,
            "stop": int(self.stop),
            "step": self.step,
            "digest": self.digest,
            "saved_step": self.saved_step,
            "configure": list(self.configure),
            "job": self.job,
            "reset": self.reset,
        }

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> Control:
        return cls(
            replica=int(body["replica"]),
            phase=str(body.get("phase", "tick")),
            epoch_seen=int(body.get("epoch_seen", 0)),
            leaving=bool(body.get("leaving", False)),
            stop=Stop(int(body.get("stop", 0))),
            step=int(body.get("step", 0)),
            digest=body.get("digest"),
            saved_step=body.get("saved_step"),
            configure=tuple(body.get("configure") or ()),
            job=body.get("job"),
            reset=bool(body.get("reset", False)),
        )


@dataclass(frozen=True)
class Decision:
    jobs: tuple[tuple[int, dict[str, Any]], ...] = ()  # (origin rank, train body), in rank order
    resets: tuple[int, ...] = ()  # origin ranks of restores and rollbacks, in rank order, before any job
    configure: tuple[tuple[int, dict[str, Any]], ...] = ()  # (origin rank, configure body), in rank order
    regroup: bool = False  # leave this epoch after the exchange and rendezvous again
    stop: Stop = Stop.NONE
    in_sync: bool | None = None  # None: some member has no digest yet
    saved_steps: tuple[int, ...] = field(default_factory=tuple)
    # Members in different phases: one left a shared request that the others are still in (a bug, or an
    # error only it met). Their exchanges no longer pair up: the group must re-form, not carry on.
    out_of_step: bool = False


def decide(controls: Sequence[Control], epoch: int) -> Decision:
    """What every member does after an exchange in epoch `epoch` (the same on all: same input, same order)."""
    out_of_step = len({c.phase for c in controls}) > 1
    regroup = out_of_step or any(c.leaving for c in controls) or max(c.epoch_seen for c in controls) > epoch
    stop = max((c.stop for c in controls), default=Stop.NONE)
    if regroup:
        stop = max(stop, Stop.REGROUP)
    return Decision(
        jobs=() if regroup else tuple((rank, c.job) for rank, c in enumerate(controls) if c.job is not None),
        resets=() if regroup else tuple(rank for rank, c in enumerate(controls) if c.reset),
        configure=tuple((rank, body) for rank, c in enumerate(controls) for body in c.configure),
        regroup=regroup,
        stop=stop,
        in_sync=in_sync(controls),
        saved_steps=tuple(sorted({c.saved_step for c in controls if c.saved_step is not None})),
        out_of_step=out_of_step,
    )


def in_sync(controls: Sequence[Control]) -> bool | None:
    """Whether every member holds the same weights: same step and same digest. None until all have a digest."""
    if any(c.digest is None for c in controls):
        return None
    return len({(c.step, c.digest) for c in controls}) == 1


def sync_source(states: Sequence[tuple[int, str | None]]) -> int:
    """The rank whose weights and optimizer state the others take when a group forms: the furthest trained.

    `states` are (step, digest) by rank. The member with the highest step has every step any member
    acknowledged (a member that restarted restored a checkpoint, which is never ahead); ties go to the lowest
    rank, so all members pick the same one.
    """
    best = max(step for step, _ in states)
    return min(rank for rank, (step, _) in enumerate(states) if step == best)


def needs_weights(states: Sequence[tuple[int, str | None]]) -> bool:
    """Whether any member's weights differ from the source's (else the broadcast of the weights is skipped)."""
    return len({digest for _, digest in states}) > 1 or any(digest is None for _, digest in states)


def agreed_loss(
    said: Sequence[tuple[float | None, tuple[str, str] | None]],
) -> tuple[float | None, tuple[str, str] | None]:
    """The held-out loss every member of a shared request judges the evaluation gate with, from each member's
    (loss, error) by rank: the lowest rank that computed one (a member that joined after the evaluation set
    was sent holds none), else the lowest rank's error (code, message), else None (the gate is off)."""
    for loss, _ in said:
        if loss is not None:
            return loss, None
    for _, error in said:
        if error is not None:
            return None, error
    return None, None


def members_of(registered: Sequence[int]) -> tuple[int, ...]:
    """The closed member list of an epoch: ordinals, ascending (rank = index)."""
    return tuple(sorted(set(registered)))


def shard_bounds(count: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of the items one rank of `size` takes from `count`: contiguous and as even as possible.

    Ranks past `count` get an empty range and still take part in every collective (with zero gradients).
    """
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
