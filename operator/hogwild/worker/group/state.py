"""What a group does when it forms, and after a member restored or rolled back: every member ends with the same
weights, optimizer state and version.

The source is the furthest-trained member (plan.sync_source) when a group forms, and the member that restored
or rolled back after that. The weights are broadcast into every other
member's mapped tensors, in place, only when some digest differs (members that stayed together hold the same
bytes already); the optimizer state, counters and config always are (a few MB at APOLLO's rank); so is the
lineage, so that a version names the same weights on every replica.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hogwild.errors import ProtocolError
from hogwild.versions import Lineage
from hogwild.worker.group import plan
from hogwild.worker.group.comms import Comms
from hogwild.worker.group.digest import weights_digest
from hogwild.worker.trainer import Trainer

log = logging.getLogger("hogwild.worker")


@dataclass(frozen=True)
class Synced:
    source: int  # the rank the others copied
    weights_sent: bool
    step: int
    digest: str
    lineage: Lineage


def synchronize(comms: Comms, trainer: Trainer, lineage: Lineage, source: int | None = None) -> Synced:
    """Collective: call on every member of a new epoch, with the trainer attached. Holds the trainer still.

    `source`: the rank the others copy (a member that just restored or rolled back); None: the furthest trained.
    """
    with trainer.exclusive():
        params = [p for _, p in trainer.named_params]
        mine = (trainer.counters.step, weights_digest(params))
        states = [(int(s), str(d)) for s, d in comms.gather_json(list(mine))]
        source = plan.sync_source(states) if source is None else source
        send_weights = plan.needs_weights(states)
        if send_weights:
            comms.broadcast_tensors_([p.data for p in params], source)
        state: dict[str, Any] = comms.broadcast_object(
            trainer.state_dict() if comms.rank == source else None, source
        )
        if comms.rank != source:
            trainer.adopt(state)
        shared = comms.gather_json(lineage.as_dict())[source]
        digest = weights_digest(params) if send_weights else states[source][1]
    return Synced(source, send_weights, trainer.counters.step, digest, Lineage(**shared))


class RequestConsensus:
    """The evaluation gate's agreement inside one shared train request (hogwild.worker.safety.Consensus): every
    member calls each method at the same point, so every member judges with the same losses and ends with the
    same version after a revert."""

    def __init__(self, comms: Comms) -> None:
        self.comms = comms

    def loss(self, mine: float | None, error: ProtocolError | None) -> float | None:
        said = self.comms.gather_json([mine, [error.code, error.message] if error is not None else None])
        loss, failed = plan.agreed_loss([(value, (e[0], e[1]) if e else None) for value, e in said])
        if failed is not None:
            raise ProtocolError(*failed)
        return loss

    def lineage(self, mine: Lineage) -> Lineage:
        return Lineage(**self.comms.gather_json(mine.as_dict())[0])
