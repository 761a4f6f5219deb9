"""Which values each APOLLO / AdamW hyperparameter may take, checked before any is used or applied.

Why apart: the optimizer checks its param groups, and the factory checks a hot update before it touches a
running optimizer; both name the offending field in the ValueError, which goes back to the TrainingSession.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

# The names live in hogwild.config, which the operator reads without torch.
from hogwild.config import ROUNDINGS, SCALE_TYPES


def _number(name: str, value: Any, low: float, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")


def _integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _betas(value: Any) -> None:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {value!r}")
    for i, beta in enumerate(value):
        _number(f"betas[{i}]", beta, 0.0)
        if beta >= 1.0:
            raise ValueError(f"betas[{i}] must be < 1, got {beta!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


_CHECKS: dict[str, Callable[[Any], object]] = {
    "lr": lambda v: _number("lr", v, 0.0),
    "betas": _betas,
    "eps": lambda v: _number("eps", v, 0.0, low_open=True),
    "weight_decay": lambda v: _number("weight_decay", v, 0.0),
    "rank": lambda v: _integer("rank", v, 1),
    "scale_type": lambda v: _choice("scale_type", v, SCALE_TYPES),
    "update_proj_gap": lambda v: _integer("update_proj_gap", v, 1),
    "scale": lambda v: _number("scale", v, 0.0, low_open=True),
    "norm_growth_limit": lambda v: None if v is None else _number("norm_growth_limit", v, 1.0),
    "rounding": lambda v: _choice("rounding", v, ROUNDINGS),
    "seed": lambda v: _integer("seed", v, 0),
    "low_rank": lambda v: _flag("low_rank", v),
}


def validate_hyperparameters(values: Mapping[str, Any]) -> None:
    """Raise ValueError, naming the field, for any out-of-range hyperparameter in `values` (others ignored)."""
    for name, check in _CHECKS.items():
        if name in values:
            check(values[name])
