"""The interference part's protection candidates are what ships: each is a valid hot change of the worker's
`protection` settings (the bench applies it as a configure, patching nothing), and the generated table tells
their rows from the retired emulations' (`bench/gpu_table.py`). CPU-only: no process starts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from gpu_interference import CANDIDATES, DEFAULT_CANDIDATE
from gpu_table import shipped
from hogwild.config import ServingProtection, validate_changes


@pytest.mark.parametrize(("name", "settings"), CANDIDATES, ids=[name for name, _ in CANDIDATES])
def test_each_candidate_is_a_valid_protection_change(name: str, settings: dict[str, Any]) -> None:
    applied = validate_changes({"protection": settings})["protection"]
    assert isinstance(applied, ServingProtection)
    assert {key: getattr(applied, key) for key in settings} == settings


def test_candidate_names_are_unique_and_the_default_is_one_of_them() -> None:
    names = [name for name, _ in CANDIDATES]
    assert (len(names) == len(set(names)), DEFAULT_CANDIDATE in names) == (True, True)


@pytest.mark.parametrize(
    ("row_name", "current"),
    [
        ("worker-default", True),
        ("worker-default#2", True),
        ("off", True),
        ("duty-0.5", True),
        ("worker-host#3", True),
        ("yield-fine-4k", False),
        ("worker-nosplit", False),
        ("worker-default-repeat", False),
        ("worker-depth3", False),
    ],
)
def test_the_table_keeps_retired_rows_apart(row_name: str, current: bool) -> None:
    assert shipped({"name": row_name}) is current
