"""The shapes of the worker's replies: what each request's `ok` reply carries besides the envelope.

The worker builds these, the plugin's routes and the operator read them, and the wire is their JSON: a reply is
a plain dict at run time (TypedDict), so typing them changes no byte on the wire. Requests are in
hogwild.protocol, which re-exports these; the envelope (`v`, `id`, `ok`) is protocol's and never appears here.

Sub-objects owned by one module (the training config, the gate's verdict, serving protection's counts, the
replica group) stay `dict[str, Any]` here: their owner defines them, and a reader reads them defensively (a
worker of another release may say more or less).
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class TrainSteps(TypedDict):
    """What the trainer did for one train request (hogwild.worker.trainer.TrainResult)."""

    step: int  # the global optimizer step after the request
    loss: float | None  # the last finite loss of the request; None when every step was skipped
    losses: list[float | None]  # one per step; None for a step skipped as not finite
    tokens: int
    skipped: int  # steps skipped (loss or gradient not finite): the weights did not change
    steps: int
    truncated_tokens: int  # tokens cut off by max_tokens_per_step
    stopped: str | None  # why the request ended before its steps: "paused", "regrouping"; None: it did not


class TrainReply(TrainSteps):
    """train: the steps, and the weights version they left (a replica group's shared request says no more)."""

    version: str


class GatedTrainReply(TrainReply):
    """train on a lone worker: the evaluation gate's verdict on the request too (None when the gate is off)."""

    gate: dict[str, Any] | None


class CheckpointReply(TypedDict):
    step: int
    path: str
    bytes: int
    seconds: float
    reason: str
    pruned: list[str]  # older checkpoints removed to keep `checkpoint.keep`
    version: str | None  # the weights version it holds (None: written by a release without versions)


class ConfigureReply(TypedDict):
    applied: list[str]  # the fields whose value changed
    state_reset: bool  # a change (optimizer, rank, ...) reset the optimizer's state
    config: dict[str, Any]  # the whole training config now (hogwild.config.config_to_dict)


class RestoreReply(TypedDict):
    version: str
    step: int
    path: str
    weights: bool
    optimizer: bool  # the optimizer state was restored too (False: the checkpoint had none, or not asked)


class Restored(TypedDict):
    kind: str  # "snapshot" or "checkpoint"
    version: str | None
    step: int | None
    path: NotRequired[str]  # a checkpoint's directory


class RollbackReply(TypedDict):
    restored: Restored
    from_version: str
    version: str
    optimizer: bool
    seconds: float
    repeated: NotRequired[bool]  # True: this request id was applied already; the weights did not move again


class CheckpointSummary(TypedDict):
    step: int
    path: str
    time: float


class SafetyStatus(TypedDict):
    """The part of status that hogwild.worker.safety owns: versions, kept versions, the gate, rollbacks."""

    version: str
    lineage: dict[str, Any]
    snapshots: list[dict[str, Any]]
    snapshot_bytes: int
    kept_checkpoints: list[dict[str, Any]]
    gate: dict[str, Any]
    rollbacks: int
    last_rollback: dict[str, Any] | None


class Endpoints(TypedDict, total=False):
    """Where the worker answers (hogwild.worker.main sets them once its sockets are up)."""

    incarnation: str  # which worker process answers: a change means the last one died
    metrics_port: int
    ipc_endpoint: str
    control_endpoint: str | None


class StatusReply(TypedDict):
    """status: what the worker holds and does now. The safety part (`version` ... `last_rollback`,
    SafetyStatus) and the endpoints (Endpoints) are absent only from a worker that has none of them yet."""

    connected: bool  # the served weights are mapped
    paused: bool
    busy: bool  # a train request runs
    checkpointing: bool  # a checkpoint, restore or rollback runs
    step: int
    tokens_trained: int
    loss: float | None
    skipped_steps: int
    last_checkpoint: CheckpointSummary | None
    config: dict[str, Any]
    exporter: dict[str, Any] | None  # who exported the mapped weights (nonce, pid, model_path, ...)
    optimizer: str | None
    optimizer_state_bytes: int
    weight_bytes: int
    device: str | None
    trained_since_checkpoint: bool
    mapping_error: str | None
    protection: dict[str, Any] | None
    group: dict[str, Any]
    version: NotRequired[str]
    lineage: NotRequired[dict[str, Any]]
    snapshots: NotRequired[list[dict[str, Any]]]
    snapshot_bytes: NotRequired[int]
    kept_checkpoints: NotRequired[list[dict[str, Any]]]
    gate: NotRequired[dict[str, Any]]
    rollbacks: NotRequired[int]
    last_rollback: NotRequired[dict[str, Any] | None]
    incarnation: NotRequired[str]
    metrics_port: NotRequired[int]
    ipc_endpoint: NotRequired[str]
    control_endpoint: NotRequired[str | None]


class JoinReply(TypedDict):
    """join: the replica group this worker now belongs to (hogwild.worker.group.runner's status)."""

    joined: bool  # False: it was a member of that group already (a repeated join changes nothing)
    group: dict[str, Any]


Reply = (
    TrainReply
    | GatedTrainReply
    | CheckpointReply
    | ConfigureReply
    | RestoreReply
    | RollbackReply
    | JoinReply
    | StatusReply
)
