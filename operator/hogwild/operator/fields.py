"""Small typed readers of untrusted JSON (a CR spec): each returns a clean value or raises SpecError naming
the field (`spec.gpu.count: must be ...`). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
STORAGE_SIZE = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


class SpecError(ValueError):
    """The spec cannot be run; the message names the field (`spec.gpu.count: ...`)."""


def obj(where: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: must be an object, got {type(value).__name__}")
    return value


def known(where: str, value: Mapping[str, Any], allowed: set[str] | Mapping[str, Any]) -> None:
    unknown = set(value) - set(allowed)
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")


def string(where: str, value: Any, default: str | None = None, *, required: bool = False) -> Any:
    if value is None:
        if required:
            raise SpecError(f"{where}: required")
        return default
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: must be a non-empty string, got {value!r}")
    return value


def choice(where: str, value: Any, allowed: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    if value not in allowed:
        raise SpecError(f"{where}: must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def whole_number(where: str, value: Any, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"{where}: must be a whole number from {low} to {high}, got {value!r}")
    return value


def number(where: str, value: Any, default: float, low: float, high: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise SpecError(f"{where}: must be a number from {low} to {high}, got {value!r}")
    return float(value)


def flag(where: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(f"{where}: must be true or false, got {value!r}")
    return value


def str_map(where: str, value: Any) -> dict[str, str]:
    mapping = obj(where, value)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise SpecError(f"{where}: must map strings to strings")
    return dict(mapping)


def str_list(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}: must be a list of strings")
    return tuple(value)


def quantities(where: str, value: Any) -> dict[str, str]:
    out = {}
    for name, quantity in obj(where, value).items():
        text = (
            str(quantity)
            if isinstance(quantity, int | float) and not isinstance(quantity, bool)
            else quantity
        )
        if not isinstance(text, str) or not QUANTITY.match(text):
            raise SpecError(f"{where}.{name}: must be a quantity such as 4, 500m or 16Gi, got {quantity!r}")
        out[name] = text
    return out
