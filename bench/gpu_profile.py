"""The optimizer part's `--profile`: where an APOLLO step's time goes, on the host and in its CUDA kernels.

Split out of `gpu_bench.py`, which keeps the parts themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_common import log, sync


def profile_host(step: Callable[[], Any], path: Path) -> None:
    """Where the step's host time goes: cProfile over 10 steps, by own time (the top in the log)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(10):
        step()
    profiler.disable()
    sync()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(45)
    path.write_text(text.getvalue())
    log("apollo host profile (10 steps, by own time):\n" + "\n".join(text.getvalue().splitlines()[:40]))


def profile_step(step: Callable[[], Any], path: Path) -> None:
    """The step's CUDA kernels by total time (a table in `path`, the top in the log)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    path.write_text(table)
    log("apollo profile (3 steps):\n" + "\n".join(table.splitlines()[:25]))
