"""Kept versions in host memory: the served weights and the optimizer state as they were before an update.

A snapshot is a plain copy in host memory (CPU tensors): the weights under HF names (what a checkpoint
saves) and the trainer's state dict (optimizer state, counters, config). It costs host RAM the size of the
weights plus the optimizer state, and one device-to-host copy of each (bench/snapshots.py measures both).
Restoring copies the weights back INTO the served tensors (never rebinding: vLLM keeps reading them) and
loads a fresh copy of the optimizer state, so the snapshot stays intact for a later rollback to it.

`previous` follows ancestry, not time: each snapshot records the snapshot before it in the current weights'
history (`parent`), so after a rollback to a snapshot, `previous` is what came before THAT one, not the
abandoned update just undone. Callers hold the trainer's lock.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from hogwild.versions import Kept
from hogwild.worker.model import MappedModel
from hogwild.worker.trainer import Trainer


def clone_tree(value: Any) -> Any:
    """A deep copy of a state dict in host memory: every tensor copied to the CPU, containers rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: clone_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(clone_tree(v) for v in value)
    return value


def tree_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tree_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(tree_bytes(v) for v in value)
    return 0


@dataclass(frozen=True)
class Snapshot:
    seq: int
    version: str
    step: int
    parent: int | None  # seq of the snapshot before this one in the weights' history
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    bytes: int
    seconds: float  # what taking it cost

    def kept(self) -> Kept:
        return Kept("snapshot", str(self.seq), self.version, self.step)

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "step": self.step, "bytes": self.bytes, "seconds": self.seconds}


def take(trainer: Trainer, mapped: MappedModel, *, seq: int, version: str, parent: int | None) -> Snapshot:
    started = time.perf_counter()
    weights = {name: t.detach().to("cpu", copy=True) for name, t in mapped.checkpoint_tensors().items()}
    state = clone_tree(trainer.state_dict())
    size = tree_bytes(weights) + tree_bytes(state)
    return Snapshot(
        seq, version, trainer.counters.step, parent, weights, state, size, time.perf_counter() - started
    )


def restore(snapshot: Snapshot, trainer: Trainer, mapped: MappedModel) -> bool:
    """Copy the snapshot into the served weights and the optimizer. Returns whether the optimizer state
    was loaded (not when the optimizer was reconfigured to another shape since)."""
    targets = mapped.checkpoint_tensors()
    missing = sorted(set(targets) ^ set(snapshot.weights))
    if missing:
        raise ValueError(f"the snapshot does not fit the served weights (e.g. {missing[:3]})")
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(snapshot.weights[name])
    return trainer.load_state_dict(clone_tree(snapshot.state))


class Snapshots:
    """At most `keep` snapshots, newest last, and `head`: the snapshot `previous` means now."""

    def __init__(self) -> None:
        self.items: list[Snapshot] = []
        self.head: int | None = None
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def add(self, snapshot: Snapshot, keep: int) -> None:
        """Keep it (the newest) and make it `previous`; drop the oldest beyond `keep`."""
        self.head = snapshot.seq
        if keep > 0:
            self.items.append(snapshot)
        self.trim(keep)

    def trim(self, keep: int) -> None:
        del self.items[: max(0, len(self.items) - keep)]

    def get(self, seq: int | None) -> Snapshot | None:
        return next((s for s in self.items if s.seq == seq), None)

    def went_back_to(self, snapshot: Snapshot | None) -> None:
        """The weights are now `snapshot`'s (None: a checkpoint's): `previous` is what preceded it."""
        self.head = snapshot.parent if snapshot is not None else None

    def kept(self) -> list[Kept]:
        return [s.kept() for s in self.items]

    def summaries(self) -> list[dict[str, Any]]:
        return [s.summary() for s in reversed(self.items)]

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.items)

    def versions(self) -> Iterable[str]:
        return (s.version for s in self.items)
