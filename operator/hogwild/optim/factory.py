"""Build the training optimizer from its hyperparameters, and change them while it runs.

The worker keeps one optimizer over the served model's weights for as long as it runs. A hyperparameter
change from the TrainingSession either applies to that optimizer in place, keeping its state (lr, betas, eps,
weight_decay, scale), or changes what the state means (optimizer, rank, scale_type, update_proj_gap,
rounding): then the caller builds a new optimizer and the reply says `state_reset: true` (docs/design.md, "Which
spec changes apply hot"). Which field is which comes from `hogwild.config`; this module only knows how each
field maps onto an optimizer's param groups. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer

from hogwild.config import HOT_FIELDS, OPTIMIZERS, STATE_RESET_FIELDS
from hogwild.optim.apollo import APOLLO_MINI_SCALE, Apollo
from hogwild.optim.hyperparameters import validate_hyperparameters

OPTIMIZER_FIELDS = frozenset(
    {
        "optimizer",
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "rank",
        "scale_type",
        "update_proj_gap",
        "scale",
        "rounding",
    }
)
OPTIMIZER_HOT_FIELDS = HOT_FIELDS & OPTIMIZER_FIELDS
OPTIMIZER_RESET_FIELDS = STATE_RESET_FIELDS & OPTIMIZER_FIELDS
# Substrings of parameter names that mark token embeddings and the output head.
EMBEDDING_NAME_PARTS = ("embed", "lm_head", "wte", "wpe")
# The param-group key recording which optimizer the factory built (apollo-mini is an Apollo with rank 1).
KIND_KEY = "optimizer"


class OptimizerSettings(Protocol):
    """What the factory reads; `hogwild.config.TrainingConfig` is one."""

    @property
    def optimizer(self) -> str: ...
    @property
    def lr(self) -> float: ...
    @property
    def betas(self) -> tuple[float, float]: ...
    @property
    def eps(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def rank(self) -> int: ...
    @property
    def scale_type(self) -> str: ...
    @property
    def update_proj_gap(self) -> int: ...
    @property
    def scale(self) -> float: ...
    @property
    def rounding(self) -> str: ...


@dataclass(frozen=True)
class HotUpdate:
    """What `apply_hot_update` did with a set of changes."""

    applied: frozenset[str]  # now on every param group; optimizer state kept
    state_reset: frozenset[str]  # need a new optimizer (build_optimizer); not applied
    ignored: frozenset[str]  # not the optimizer's (clip_grad_norm, ...), or meaningless to it (AdamW's scale)

    @property
    def needs_reset(self) -> bool:
        return bool(self.state_reset)


def group_hyperparameters(settings: OptimizerSettings) -> dict[str, Any]:
    """The param-group values of the optimizer `settings.optimizer` names.

    APOLLO-Mini is Apollo with rank 1, tensor-wise scaling and scale sqrt(128) (the paper's setting);
    `settings.scale` multiplies that, and `settings.rank` / `settings.scale_type` do not apply to it.
    """
    kind = settings.optimizer
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    common = {
        "lr": settings.lr,
        "betas": tuple(settings.betas),
        "eps": settings.eps,
        "weight_decay": settings.weight_decay,
    }
    if kind == "adamw":
        return common
    apollo = {
        **common,
        "rank": settings.rank,
        "scale_type": settings.scale_type,
        "update_proj_gap": settings.update_proj_gap,
        "scale": settings.scale,
        "rounding": settings.rounding,
    }
    if kind == "apollo-mini":
        apollo.update(rank=1, scale_type="tensor", scale=APOLLO_MINI_SCALE * settings.scale)
    return apollo


def build_optimizer(
    params: Iterable[Tensor] | Iterable[dict[str, Any]], settings: OptimizerSettings
) -> Optimizer:
    """A fresh optimizer: `Apollo` for "apollo" and "apollo-mini", torch's own AdamW for "adamw".

    `params` are tensors or param groups (see `param_groups`); each group also records the kind under
    `KIND_KEY`, so that later hot updates know what `scale` means.
    """
    hyperparameters = group_hyperparameters(settings)
    optimizer: Optimizer
    if settings.optimizer == "adamw":
        validate_hyperparameters(hyperparameters)
        optimizer = torch.optim.AdamW(params, **hyperparameters)
    else:
        optimizer = Apollo(params, **hyperparameters)
    for group in optimizer.param_groups:
        group[KIND_KEY] = settings.optimizer
    return optimizer


def param_groups(
    named_parameters: Iterable[tuple[str, Tensor]], *, full_rank_embeddings: bool = False
) -> list[dict[str, Any]]:
    """Param groups for a model: with `full_rank_embeddings`, embeddings and the output head get AdamW.

    They are the largest matrices; APOLLO keeps their state small (vocab x rank), which is the default.
    Parameters that do not require gradients are left out.
    """
    embeddings: list[Tensor] = []
    others: list[Tensor] = []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        is_embedding = any(part in name for part in EMBEDDING_NAME_PARTS)
        (embeddings if full_rank_embeddings and is_embedding else others).append(param)
    groups: list[dict[str, Any]] = [{"params": others}]
    if embeddings:
        groups.append({"params": embeddings, "low_rank": False})
    return [group for group in groups if group["params"]]


def apply_hot_update(optimizer: Optimizer, changes: Mapping[str, Any]) -> HotUpdate:
    """Apply the hot optimizer fields of `changes` to every param group, keeping the state.

    Field names are the protocol's snake_case. All values are checked before any is applied (ValueError).
    State-resetting fields whose value differs from the optimizer's are reported, not applied.
    """
    kind = optimizer.param_groups[0].get(KIND_KEY, "apollo" if isinstance(optimizer, Apollo) else "adamw")
    values = {name: changes[name] for name in changes if name in OPTIMIZER_HOT_FIELDS}
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    validate_hyperparameters(values)
    ignored = {name for name in changes if name not in OPTIMIZER_FIELDS}
    if kind == "adamw" and "scale" in values:
        del values["scale"]
        ignored.add("scale")
    elif kind == "apollo-mini" and "scale" in values:
        values["scale"] = APOLLO_MINI_SCALE * values["scale"]
    for group in optimizer.param_groups:
        group.update(values)
    first = optimizer.param_groups[0]
    current = {**first, KIND_KEY: kind}
    reset = {
        name
        for name in changes
        if name in OPTIMIZER_RESET_FIELDS and (name not in current or current[name] != changes[name])
    }
    applied = {name for name in changes if name in OPTIMIZER_HOT_FIELDS} - ignored
    return HotUpdate(frozenset(applied), frozenset(reset), frozenset(ignored))


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes of tensor state the optimizer holds (moments, limiter norms, compensation buffers)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor)
    )
