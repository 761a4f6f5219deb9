"""The benchmark suite's index (`python -m bench`): every runnable part is listed, and the entry point runs
a part with its own arguments. Benchmarks themselves are not tests; this only keeps the index from rotting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hogwild.testing.children import child_env

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.__main__ import PARTS  # noqa: E402


def runnable_scripts() -> set[str]:
    return {p.name for p in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__"' in p.read_text()}


def test_every_runnable_bench_script_is_a_part() -> None:
    assert {script for script, _, _ in PARTS.values()} == runnable_scripts() - {
        "__main__.py",
        "gpu_server.py",
        "gpu_trainer.py",
    }


@pytest.mark.parametrize(("argv", "code", "says"), [
    ([], 2, "parts:"),
    (["--help"], 0, "loadgen"),
    (["no-such-part"], 2, "unknown part"),
    (["loadgen", "--help"], 0, "usage:"),
    (["replicas", "--help"], 0, "unverified"),  # imports the group's test helpers and hogwild.worker
], ids=["bare", "help", "unknown", "part-help", "replicas-help"])  # fmt: skip
def test_entry_point(argv: list[str], code: int, says: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", *argv], cwd=ROOT, env=child_env(), capture_output=True, text=True
    )
    assert result.returncode == code, result.stderr
    assert says in result.stdout + result.stderr
