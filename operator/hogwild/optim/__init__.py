"""Optimizers for training a served model in place: APOLLO (our own, from the paper) and its factory.

`Apollo` is a `torch.optim.Optimizer`; `build_optimizer` makes the one a `TrainingConfig` names and
`apply_hot_update` changes its hyperparameters while it runs. `rounding` writes fp32 updates into bf16
weights without losing them.
"""

from hogwild.config import ROUNDINGS, SCALE_TYPES
from hogwild.optim.apollo import APOLLO_MINI_SCALE, Apollo
from hogwild.optim.factory import (
    OPTIMIZER_HOT_FIELDS,
    OPTIMIZER_RESET_FIELDS,
    HotUpdate,
    OptimizerSettings,
    apply_hot_update,
    build_optimizer,
    group_hyperparameters,
    param_groups,
    state_bytes,
)
from hogwild.optim.hyperparameters import validate_hyperparameters
from hogwild.optim.projections import projection_matrix
from hogwild.optim.rounding import apply_update_, apply_updates_, stochastic_round_bf16_

__all__ = [
    "APOLLO_MINI_SCALE",
    "OPTIMIZER_HOT_FIELDS",
    "OPTIMIZER_RESET_FIELDS",
    "ROUNDINGS",
    "SCALE_TYPES",
    "Apollo",
    "HotUpdate",
    "OptimizerSettings",
    "apply_hot_update",
    "apply_update_",
    "apply_updates_",
    "build_optimizer",
    "group_hyperparameters",
    "param_groups",
    "projection_matrix",
    "state_bytes",
    "stochastic_round_bf16_",
    "validate_hyperparameters",
]
