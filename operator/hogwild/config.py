"""Training hyperparameters: one frozen dataclass shared by the CR, the protocol and the worker.

Field names are the protocol's snake_case names (docs/design.md "Which spec changes apply hot"). The operator
maps the CR's camelCase onto them; the worker applies them. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("apollo", "apollo-mini", "adamw")
SCALE_TYPES = ("channel", "tensor")
ROUNDINGS = ("stochastic", "kahan", "nearest")
PREFIX_CACHE_POLICIES = ("reset", "keep")


@dataclass(frozen=True)
class ServingProtection:
    """How training yields to serving. Applied hot.

    `max_duty_cycle` caps the fraction of wall time the trainer computes; `yield_when_busy` makes the trainer
    wait at each preemption point (every projection, layer, head chunk and optimizer bucket) while vLLM has
    requests in flight, up to `max_wait_s` per point. On by default: without it, training beside a half-loaded
    server let the serving queue grow without bound on an H100 (bench/RESULTS.md). `min_training_share` bounds
    what a server that never idles can take: training keeps at least that share of its own time (a token
    bucket, hogwild.worker.protection.share: each second trained earns (1 - share) / share seconds of
    holding; 0: serving may starve training). `gpu_wait` makes the points wait in
    the GPU stream itself where the driver allows (hogwild.worker.protection.device: the host keeps launching, so
    training loses far less to the waits; on an H100 at 1.5B, half-loaded, it kept 0.60 of its idle-server speed
    against 0.42 on the host, at serving p99 1.09x against 1.11x: bench/RESULTS.md), else on the host.
    """

    max_duty_cycle: float = 1.0
    yield_when_busy: bool = True
    max_wait_s: float = 1.0
    min_training_share: float = 0.1
    gpu_wait: bool = True


@dataclass(frozen=True)
class EvalGate:
    """The evaluation gate: how far one /train request may raise the held-out loss before it is reverted.

    `max_loss_rise` bounds the absolute rise, `max_loss_rise_ratio` the rise relative to the loss before;
    None turns a bound off, and with both off the gate is off. The evaluation set comes with configure's
    `eval_samples` or from `eval_file` (JSON lines, one sample per line, on a volume the worker reads).
    Applied hot, as a whole: fields left out take their defaults.
    """

    max_loss_rise: float | None = None
    max_loss_rise_ratio: float | None = None
    eval_file: str = ""

    @property
    def enabled(self) -> bool:
        return self.max_loss_rise is not None or self.max_loss_rise_ratio is not None


@dataclass(frozen=True)
class TrainingConfig:
    optimizer: str = "apollo"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    rank: int = 64
    scale_type: str = "channel"
    update_proj_gap: int = 200
    scale: float = 1.0
    rounding: str = "stochastic"
    clip_grad_norm: float = 1.0
    max_tokens_per_step: int = 4096
    grad_accumulation: int = 1
    paused: bool = False
    checkpoint_interval_s: float = 600.0
    checkpoint_keep: int = 3
    prefix_cache: str = "reset"
    protection: ServingProtection = field(default_factory=ServingProtection)
    # Kept versions in host memory (the state before each of the last N /train requests), for rollback. Each
    # costs host RAM and a device-to-host copy per /train request the size of the weights plus the optimizer
    # state (docs/safety.md); 1 keeps `previous` in memory.
    snapshots: int = 1
    gate: EvalGate = field(default_factory=EvalGate)


# Changes to these apply to the running optimizer and keep its state.
HOT_FIELDS = frozenset(
    {
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "scale",
        "clip_grad_norm",
        "max_tokens_per_step",
        "grad_accumulation",
        "paused",
        "checkpoint_interval_s",
        "checkpoint_keep",
        "prefix_cache",
        "protection",
        "snapshots",
        "gate",
    }
)
# Changes to these need a new optimizer: they apply hot but reset the optimizer state.
STATE_RESET_FIELDS = frozenset({"optimizer", "rank", "scale_type", "update_proj_gap", "rounding"})
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainingConfig))
assert HOT_FIELDS | STATE_RESET_FIELDS == CONFIG_FIELDS


class ConfigError(ValueError):
    """A hyperparameter is out of range; the message names the field and says what is allowed."""


def _number(name: str, value: Any, *, low: float, high: float = math.inf, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if integer and (not float(value).is_integer()):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value!r}")
    return int(value) if integer else float(value)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _betas(value: Any) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ConfigError(f"betas must be a list of two numbers in [0, 1), got {value!r}")
    b1 = _number("betas[0]", value[0], low=0.0, high=0.999999)
    b2 = _number("betas[1]", value[1], low=0.0, high=0.999999)
    return (b1, b2)


def _protection(value: Any) -> ServingProtection:
    if isinstance(value, ServingProtection):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"protection must be an object, got {value!r}")
    unknown = set(value) - {f.name for f in dataclasses.fields(ServingProtection)}
    if unknown:
        raise ConfigError(f"protection has unknown fields: {', '.join(sorted(unknown))}")
    current = ServingProtection()
    return ServingProtection(
        max_duty_cycle=_number(
            "protection.max_duty_cycle",
            value.get("max_duty_cycle", current.max_duty_cycle),
            low=0.01,
            high=1.0,
        ),
        yield_when_busy=_flag(
            "protection.yield_when_busy", value.get("yield_when_busy", current.yield_when_busy)
        ),
        max_wait_s=_number("protection.max_wait_s", value.get("max_wait_s", current.max_wait_s), low=0.0),
        min_training_share=_number(
            "protection.min_training_share",
            value.get("min_training_share", current.min_training_share),
            low=0.0,
            high=0.9,
        ),
        gpu_wait=_flag("protection.gpu_wait", value.get("gpu_wait", current.gpu_wait)),
    )


def _bound(name: str, value: Any) -> float | None:
    return None if value is None else _number(name, value, low=0.0)


def _gate(value: Any) -> EvalGate:
    if isinstance(value, EvalGate):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"gate must be an object, got {value!r}")
    unknown = set(value) - {f.name for f in dataclasses.fields(EvalGate)}
    if unknown:
        raise ConfigError(f"gate has unknown fields: {', '.join(sorted(unknown))}")
    eval_file = value.get("eval_file", "")
    if not isinstance(eval_file, str) or (eval_file and not eval_file.startswith("/")):
        raise ConfigError(f"gate.eval_file must be an absolute path or empty, got {eval_file!r}")
    return EvalGate(
        max_loss_rise=_bound("gate.max_loss_rise", value.get("max_loss_rise")),
        max_loss_rise_ratio=_bound("gate.max_loss_rise_ratio", value.get("max_loss_rise_ratio")),
        eval_file=eval_file,
    )


_VALIDATORS: dict[str, Any] = {
    "optimizer": lambda v: _choice("optimizer", v, OPTIMIZERS),
    "lr": lambda v: _number("lr", v, low=0.0, high=1.0),
    "betas": _betas,
    "eps": lambda v: _number("eps", v, low=1e-30, high=1.0),
    "weight_decay": lambda v: _number("weight_decay", v, low=0.0, high=1.0),
    "rank": lambda v: _number("rank", v, low=1, high=65536, integer=True),
    "scale_type": lambda v: _choice("scale_type", v, SCALE_TYPES),
    "update_proj_gap": lambda v: _number("update_proj_gap", v, low=1, high=10**9, integer=True),
    "scale": lambda v: _number("scale", v, low=0.0, high=1e6),
    "rounding": lambda v: _choice("rounding", v, ROUNDINGS),
    "clip_grad_norm": lambda v: _number("clip_grad_norm", v, low=0.0),
    "max_tokens_per_step": lambda v: _number("max_tokens_per_step", v, low=1, high=10**8, integer=True),
    "grad_accumulation": lambda v: _number("grad_accumulation", v, low=1, high=10**6, integer=True),
    "paused": lambda v: _flag("paused", v),
    "checkpoint_interval_s": lambda v: _number("checkpoint_interval_s", v, low=0.0),
    "checkpoint_keep": lambda v: _number("checkpoint_keep", v, low=1, high=1000, integer=True),
    "prefix_cache": lambda v: _choice("prefix_cache", v, PREFIX_CACHE_POLICIES),
    "protection": _protection,
    "snapshots": lambda v: _number("snapshots", v, low=0, high=64, integer=True),
    "gate": _gate,
}


def validate_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Check a partial set of hyperparameters; return them normalized. Raises ConfigError."""
    if not isinstance(changes, Mapping):
        raise ConfigError(f"changes must be an object, got {type(changes).__name__}")
    unknown = set(changes) - CONFIG_FIELDS
    if unknown:
        raise ConfigError(
            f"unknown hyperparameter(s): {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(CONFIG_FIELDS))}"
        )
    return {name: _VALIDATORS[name](value) for name, value in changes.items()}


def apply_changes(config: TrainingConfig, changes: Mapping[str, Any]) -> tuple[TrainingConfig, bool]:
    """Return the new config and whether the optimizer state must be reset."""
    normalized = validate_changes(changes)
    effective = {k: v for k, v in normalized.items() if getattr(config, k) != v}
    return dataclasses.replace(config, **effective), bool(set(effective) & STATE_RESET_FIELDS)


def config_from_dict(values: Mapping[str, Any]) -> TrainingConfig:
    return apply_changes(TrainingConfig(), values)[0]


def config_to_dict(config: TrainingConfig) -> dict[str, Any]:
    """JSON-ready form (tuples become lists)."""
    data = dataclasses.asdict(config)
    data["betas"] = list(config.betas)
    return data
