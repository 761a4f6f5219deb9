"""The worker area: what the training worker does with the served weights (batches, the trainer, checkpoints,
serving protection, versions and safety, the replica group). Processes are real (`hogwild worker`, the
stand-in exporter); the `exporter` and `pod` fixtures come from tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from group_helpers import Group


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    """A replica group's processes: exporters and workers started by the test, one store in this process."""
    g = Group(tmp_path)
    try:
        yield g
    finally:
        g.close()
