"""Running a Triton kernel test on a CPU machine: the kernel under Triton's interpreter, in a child process.

Why a child: TRITON_INTERPRET is read when Triton is imported, and this process has imported it already (or
will, for the GPU tests). The child prints one `RESULT|a|b|...` line per case; the test reads their fields.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hogwild.testing.children import child_env

ROOT = Path(__file__).resolve().parent.parent


def interpreted_results(code: str, timeout_s: float = 300) -> list[list[str]]:
    """Run `code` with TRITON_INTERPRET=1 and the package on the path; the fields of each RESULT line."""
    env = child_env({"TRITON_INTERPRET": "1"})
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [line.split("|")[1:] for line in done.stdout.splitlines() if line.startswith("RESULT|")]
