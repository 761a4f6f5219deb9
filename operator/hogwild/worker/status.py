"""Pure decisions of the worker: what a manifest change means, and what `status` answers.

Kept apart from the service so that they are tested with plain tables and no processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hogwild.config import TrainingConfig, config_to_dict
from hogwild.handles import Manifest
from hogwild.protocol import CheckpointSummary, Endpoints, SafetyStatus, StatusReply

# What the watcher does after reading the manifest.
NOTHING, MAP, DISCONNECT = "nothing", "map", "disconnect"


def watch_action(current_nonce: str | None, manifest: Manifest | None, exporter_alive: bool) -> str:
    """`map` when a live exporter other than the mapped one has published weights; `disconnect` when the
    mapped exporter is gone (its memory is no longer served: training it would be lost); else `nothing`."""
    if manifest is None or not exporter_alive:
        return DISCONNECT if current_nonce is not None else NOTHING
    if manifest.exporter.nonce != current_nonce:
        return MAP
    return NOTHING


def interval_checkpoint_due(
    *, interval_s: float, since_last_s: float, trained_since_checkpoint: bool, connected: bool, writing: bool
) -> bool:
    """Whether the periodic checkpoint should start now (an interval of 0 turns it off)."""
    return (
        interval_s > 0
        and connected
        and trained_since_checkpoint
        and not writing
        and since_last_s >= interval_s
    )


@dataclass(frozen=True)
class StatusInputs:
    connected: bool
    busy: bool
    writing: bool
    step: int
    tokens_trained: int
    loss: float | None
    skipped_steps: int
    config: TrainingConfig
    last_checkpoint: CheckpointSummary | None
    manifest: Manifest | None
    optimizer: str | None
    optimizer_state_bytes: int
    weight_bytes: int
    device: str | None
    trained_since_checkpoint: bool
    mapping_error: str | None
    endpoints: Endpoints
    protection: dict[str, Any] | None = None  # what serving protection did (points, waits, waited_s, ...)
    safety: SafetyStatus | None = None  # version, lineage, kept versions, the gate (hogwild.worker.safety)
    group: dict[str, Any] | None = None  # the replica group (hogwild.worker.group); None: a lone worker


# What `group` says for a worker that has no replica group (one replica: it trains alone).
ALONE = {
    "replica": 0,
    "state": "alone",
    "rank": 0,
    "size": 1,
    "members": [0],
    "epoch": 0,
    "in_sync": True,
    "digest": None,
    "compared_steps": 0,
    "last_compared_step": None,
    "out_of_sync": 0,
}


def status_reply(s: StatusInputs) -> StatusReply:
    exporter = None
    if s.manifest is not None:
        exporter = {
            "nonce": s.manifest.exporter.nonce,
            "pid": s.manifest.exporter.pid,
            "model_path": s.manifest.model_path,
            "backend": s.manifest.backend,
            "vllm_version": s.manifest.vllm_version,
        }
    reply: StatusReply = {
        "connected": s.connected,
        "paused": s.config.paused,
        "busy": s.busy,
        "checkpointing": s.writing,
        "step": s.step,
        "tokens_trained": s.tokens_trained,
        "loss": s.loss,
        "skipped_steps": s.skipped_steps,
        "last_checkpoint": s.last_checkpoint,
        "config": config_to_dict(s.config),
        "exporter": exporter,
        "optimizer": s.optimizer,
        "optimizer_state_bytes": s.optimizer_state_bytes,
        "weight_bytes": s.weight_bytes,
        "device": s.device,
        "trained_since_checkpoint": s.trained_since_checkpoint,
        "mapping_error": s.mapping_error,
        "protection": s.protection,
        "group": s.group if s.group is not None else dict(ALONE),
    }
    if s.safety is not None:
        return {**reply, **s.safety, **s.endpoints}
    return {**reply, **s.endpoints}
