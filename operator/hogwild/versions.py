"""Weight versions, rollback targets and the evaluation gate's verdict. Pure: no I/O.

A weight version is `<lineage>.<step>` (docs/design.md "Seams for scale-out and safe learning"). The step is
the optimizer's step counter; the lineage is a short random id that changes whenever the served weights stop
descending from the previous version by training alone: a (re)start of the worker, a restore, a rollback, a
revert. So a version is unique across restarts and rollbacks even when step numbers repeat, and two
responses with the same version were produced by the same weights (up to a step in flight: HOGWILD).

A rollback names its target as `previous` (the state before the last kept update), a version, or a
checkpoint step; `pick_target` chooses among what is kept (snapshots in host memory, checkpoints on the
volume) without touching either.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

HEADER = "x-hogwild-weights-version"
FIRST_HEADER = "x-hogwild-weights-version-first"
# The SSE comment a streamed response ends with: the version when its last token was sent.
STREAM_COMMENT_PREFIX = ": x-hogwild-weights-version-last "
VERSION_FILE = "weights-version"  # in the run dir: the worker writes it, vLLM's side reads it
LINEAGE_CHARS = 8
_VERSION = re.compile(r"^([0-9a-f]{8})\.(0|[1-9][0-9]{0,11})$")
PREVIOUS = "previous"


def new_lineage() -> str:
    return secrets.token_hex(LINEAGE_CHARS // 2)


@dataclass(frozen=True)
class Version:
    lineage: str
    step: int

    def __str__(self) -> str:
        return f"{self.lineage}.{self.step}"


def parse_version(text: str) -> Version | None:
    """`"3fa2c901.12"` -> Version("3fa2c901", 12); None for anything else."""
    match = _VERSION.match(text) if isinstance(text, str) else None
    return Version(match.group(1), int(match.group(2))) if match else None


@dataclass(frozen=True)
class Lineage:
    """Where a lineage's weights came from: `origin` is what a person reads ("start", "checkpoint step 12",
    "rollback to 3fa2c901.12", "revert of 3fa2c901.14"), `parent` the version it descends from, if known."""

    id: str
    origin: str
    parent: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"id": self.id, "origin": self.origin, "parent": self.parent}


# ---- rollback targets --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What a rollback asked for: exactly one of previous / version / step."""

    previous: bool = False
    version: str | None = None
    step: int | None = None

    def __str__(self) -> str:
        if self.previous:
            return PREVIOUS
        return self.version if self.version is not None else f"checkpoint step {self.step}"


class TargetError(ValueError):
    pass


def parse_target(value: object) -> Target:
    """`"previous"`, `"<lineage>.<step>"` or a checkpoint step (a whole number). Raises TargetError."""
    if value == PREVIOUS:
        return Target(previous=True)
    if isinstance(value, str):
        if parse_version(value) is None:
            raise TargetError(
                f"to must be 'previous', a version '<8 hex>.<step>' or a checkpoint step; got {value!r}"
            )
        return Target(version=value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Target(step=value)
    raise TargetError(f"to must be 'previous', a version or a checkpoint step (>= 0); got {value!r}")


@dataclass(frozen=True)
class Kept:
    """One kept state a rollback can go to. `kind` "snapshot" (host memory) or "checkpoint" (volume);
    `key` finds it again (the snapshot's sequence number or the checkpoint's path)."""

    kind: str
    key: str
    version: str | None
    step: int


def pick_target(
    target: Target,
    *,
    current: str,
    previous_snapshot: Kept | None,
    snapshots: Sequence[Kept],
    checkpoints: Sequence[Kept],
) -> Kept:
    """The kept state `target` names. Raises TargetError with what IS kept when there is none.

    `previous` is the snapshot taken before the last update of the current weights' ancestry (the caller
    tracks it), else the newest checkpoint of another version at or below the current step. A version is
    looked up among snapshots first (they are newer), then checkpoints; a step only among checkpoints."""
    parsed = parse_version(current)
    current_step = parsed.step if parsed is not None else math.inf
    found: Kept | None = None
    if target.previous:
        found = previous_snapshot
        if found is None:
            older = [c for c in checkpoints if c.version != current and c.step <= current_step]
            found = max(older, key=lambda c: c.step) if older else None
    elif target.version is not None:
        found = next((k for k in [*snapshots, *checkpoints] if k.version == target.version), None)
    else:
        found = next((c for c in checkpoints if c.step == target.step), None)
    if found is None:
        kept = sorted({k.version for k in [*snapshots, *checkpoints] if k.version})
        steps = sorted(c.step for c in checkpoints)
        raise TargetError(
            f"nothing kept matches {target}; kept versions: {', '.join(kept) or 'none'}; "
            f"checkpoint steps: {', '.join(map(str, steps)) or 'none'}"
        )
    return found


# ---- the evaluation gate -----------------------------------------------------------------------------------
ACCEPTED, REVERTED = "accepted", "reverted"


@dataclass(frozen=True)
class Verdict:
    verdict: str
    loss_before: float
    loss_after: float | None  # None when not finite
    reason: str

    def as_dict(self) -> dict[str, object]:
        rise = None if self.loss_after is None else self.loss_after - self.loss_before
        return {
            "verdict": self.verdict,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "loss_rise": rise,
            "reason": self.reason,
        }


def judge(before: float, after: float, *, max_rise: float | None, max_rise_ratio: float | None) -> Verdict:
    """Whether an update whose held-out loss went from `before` to `after` is kept.

    Rejected when the loss is not finite, or rose by more than `max_rise` (absolute) or `max_rise_ratio`
    times `before` (relative); with both set, both must hold."""
    if not math.isfinite(after):
        return Verdict(REVERTED, before, None, "the held-out loss after the update is not finite")
    rise = after - before
    broken = []
    if max_rise is not None and rise > max_rise:
        broken.append(f"rose by {rise:.6g} > max_loss_rise {max_rise:g}")
    if max_rise_ratio is not None and rise > max_rise_ratio * abs(before):
        broken.append(f"rose by {rise / abs(before) if before else math.inf:.4g}x > max_loss_rise_ratio")
    if broken:
        return Verdict(REVERTED, before, after, "held-out loss " + "; ".join(broken))
    return Verdict(ACCEPTED, before, after, f"held-out loss changed by {rise:+.6g}, within the policy")
