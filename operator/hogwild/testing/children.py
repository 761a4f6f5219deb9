"""The environment for the test helpers' `python -m hogwild...` children."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import hogwild

# The directory this `hogwild` was imported from (the checkout's `operator/`, or site-packages).
SOURCE_ROOT = str(Path(hogwild.__file__).resolve().parent.parent)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus `extra`, with SOURCE_ROOT first on PYTHONPATH.

    Why: a child must run the same code as its parent. pytest puts the checkout on the parent's path
    (pyproject's `pythonpath`) but not on a child's, which then finds either nothing (the GPU machine, no
    install) or whatever checkout a shared venv's editable install last pointed at."""
    env = {**os.environ, **(extra or {})}
    paths = [SOURCE_ROOT, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != SOURCE_ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env
