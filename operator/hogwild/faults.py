"""Fault injection for crash tests: a named point kills this process when HOGWILD_FAULT names it.

Crash tests must not depend on timing (docs/design.md "Tests and CI"): instead of killing a process "at about the
right moment", a test sets e.g. `HOGWILD_FAULT=checkpoint.after_weights` and the process SIGKILLs itself
exactly there, the way the kernel's OOM killer or `kill -9` would. `name:N` fires on the Nth time the point
is reached (so a test can let the first checkpoint through and kill the second); several points may be
listed, comma-separated. With the variable unset, a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading

from hogwild.defaults import ENV_FAULT

_hits: dict[str, int] = {}
_lock = threading.Lock()


def parse_faults(spec: str) -> dict[str, int]:
    """`"a.b, c.d:3"` -> {"a.b": 1, "c.d": 3}: which points fire, and on which hit. Pure."""
    faults: dict[str, int] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, nth = item.partition(":")
        faults[name.strip()] = int(nth) if nth.strip().isdigit() and int(nth) > 0 else 1
    return faults


def fault_point(name: str) -> None:
    """Die here, by SIGKILL (no cleanup, no atexit), if HOGWILD_FAULT says so."""
    spec = os.environ.get(ENV_FAULT)
    if not spec:
        return
    nth = parse_faults(spec).get(name)
    if nth is None:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] < nth:
            return
    os.kill(os.getpid(), signal.SIGKILL)
