"""The `hogwild` command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("hogwild: not yet", sys.argv if argv is None else argv)
    return 0
