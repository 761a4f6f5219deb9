"""The worker's side of checkpoints: what it saves, what it restores, and whether anything is unsaved.

`hogwild.checkpoint` fixes the layout and does the file I/O; this module decides what goes in (the served
weights under HF names, the trainer's state, where the weights came from) and what comes back out. Callers
hold the trainer's lock, so no step changes the weights halfway through.

"Unsaved since" is a marker file in the run dir named after the exporter's nonce, holding the wall time of
the first applied step that no checkpoint has: it survives a worker restart (the run dir outlives the
container) but not a vLLM restart (vLLM then serves a checkpoint or the base model: nothing it serves is
unsaved). A restarted worker thus knows whether, and since when, vLLM's weights hold training that no
checkpoint has, and the SIGTERM checkpoint is skipped when nothing would be lost. A successful checkpoint
removes the file; a failed one leaves it, time and all; a skipped step (loss or gradient not finite)
changes neither the weights nor the optimizer state, so it does not create it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hogwild import checkpoint
from hogwild.worker.model import MappedModel
from hogwild.worker.trainer import Trainer


def checkpoint_meta(
    trainer: Trainer, mapped: MappedModel, reason: str, version: str | None = None
) -> dict[str, Any]:
    """meta.json fields beyond the layout's own; `base_model` follows a chain of checkpoints to its root."""
    model_path = mapped.manifest.model_path
    served_meta = checkpoint.read_meta(Path(model_path)) or {}
    c = trainer.counters
    return {
        "reason": reason,
        "tokens": c.tokens_trained,
        "loss": c.loss,
        "skipped_steps": c.skipped_steps,
        "model_path": model_path,
        "base_model": served_meta.get("base_model", model_path),
        "exporter_nonce": mapped.manifest.exporter.nonce,
        "weights_version": version,  # the weights' version (hogwild.versions): a rollback target by name
    }


def save(
    root: Path, trainer: Trainer, mapped: MappedModel, reason: str, version: str | None = None
) -> checkpoint.Written:
    return checkpoint.write(
        root,
        step=trainer.counters.step,
        weights=mapped.checkpoint_tensors(),
        optimizer_state=trainer.state_dict(),
        model_dir=mapped.manifest.model_path,
        meta=checkpoint_meta(trainer, mapped, reason, version),
        hf_config=mapped.module.config,
        tokenizer=trainer.tokenizer,
    )


def load(
    found: checkpoint.Checkpoint, trainer: Trainer, mapped: MappedModel, *, weights: bool, optimizer: bool
) -> bool:
    """Copy the weights into the served tensors and/or load the optimizer state. Returns whether the state
    was loaded (it is not when it was made for other parameters or another optimizer shape)."""
    if weights:
        checkpoint.load_weights_into(found, mapped.checkpoint_tensors())
    return optimizer and trainer.load_state_dict(checkpoint.load_optimizer_state(found))


def resume_point(
    checkpoints: Sequence[checkpoint.Checkpoint], nonce: str, model_path: str
) -> checkpoint.Checkpoint | None:
    """The checkpoint whose optimizer state belongs to the weights vLLM serves now. Pure (paths compared as
    given, resolved by the caller).

    - the newest one written from these very weights (same exporter nonce): their latest saved state;
    - else the one vLLM loaded them from (its model path), if it is one of ours;
    - else none: vLLM serves a model no checkpoint here was made from (e.g. the base model on purpose), so
      the optimizer starts fresh.
    """
    mine = [c for c in checkpoints if c.meta.get("exporter_nonce") == nonce]
    if mine:
        return max(mine, key=lambda c: (c.time, c.step))
    return next((c for c in checkpoints if str(c.path) == model_path), None)


class UnsavedMarker:
    """Since when the served weights (of one exporter) hold training that no checkpoint has.

    The file's content is the Unix time of the first unsaved change. An empty or unreadable one (a crash
    mid-write, or a marker from a worker that wrote no time) falls back to the file's mtime: it was created
    at that change too."""

    def __init__(self, run_dir: Path, nonce: str) -> None:
        self.path = run_dir / f".hogwild-trained-{nonce}"

    def since(self) -> float | None:
        """The time of the first unsaved change, or None when everything is saved."""
        try:
            text = self.path.read_text().strip()
            return float(text) if text else self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            try:
                return self.path.stat().st_mtime
            except OSError:
                return None

    def mark(self, when: float) -> None:
        """A change no checkpoint has, made at `when`: recorded unless an earlier one already is."""
        if self.path.exists():
            return
        tmp = self.path.with_name(f".tmp{self.path.name}")
        tmp.write_text(f"{when!r}\n")
        os.replace(tmp, self.path)

    def clear(self) -> None:
        """A checkpoint now holds everything the served weights hold."""
        self.path.unlink(missing_ok=True)


class UnsavedTracker:
    """Whether the served weights hold training that no checkpoint has: the marker of whatever is mapped now.

    `saved` remembers the (exporter nonce, step) the newest checkpoint holds, and one lock keeps the marker's
    check and change in one piece: a checkpoint waiting for the trainer's lock runs right after a step,
    before that step's on_step callback, and must not be undone by it."""

    def __init__(self, run_dir: Path, mapped: Callable[[], MappedModel | None]) -> None:
        self.run_dir, self._mapped = run_dir, mapped
        self._saved: tuple[str, int] | None = None
        self._lock = threading.Lock()

    def marker(self, mapped: MappedModel) -> UnsavedMarker:
        return UnsavedMarker(self.run_dir, mapped.manifest.exporter.nonce)

    @property
    def since(self) -> float | None:
        """Wall time of the first change to the served weights that no checkpoint has; None: all saved."""
        mapped = self._mapped()
        return self.marker(mapped).since() if mapped is not None else None

    def saved_now(self, mapped: MappedModel, step: int) -> None:
        """Under the trainer's lock: a checkpoint (or a restore of the newest one) holds the weights at `step`."""
        with self._lock:
            self._saved = (mapped.manifest.exporter.nonce, step)
            self.marker(mapped).clear()

    def unsaved_at(self, mapped: MappedModel, when: float) -> None:
        with self._lock:
            self._saved = None
            self.marker(mapped).mark(when)

    def stepped(self, mapped: MappedModel, step: int, when: float) -> None:
        """An applied step's callback: unsaved from `when`, unless a checkpoint already holds that step."""
        with self._lock:
            if self._saved == (mapped.manifest.exporter.nonce, step):
                return  # a checkpoint taken right after this step, before this callback, already holds it
            self.marker(mapped).mark(when)
