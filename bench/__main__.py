"""The benchmark suite's one entry point: `python -m bench PART [args]` from the repository root.

Each part is a script of its own (its `--help` says what it measures and where its figures go); this table
is the suite's index. `python -m bench` alone lists the parts. Benchmarks are not tests: none runs in
`.ci/run`, and their figures are recorded in `bench/results/` and `bench/RESULTS.md` with the device, the
date and the command.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# part -> (script, what it measures, where it runs)
PARTS: dict[str, tuple[str, str, str]] = {
    "gpu": (
        "gpu_bench.py",
        "map, optimizer, train, interference and check parts beside a serving stand-in",
        "GPU",
    ),
    "kernels": ("gpu_kernels.py", "the APOLLO step's Triton kernels at 1.5B and 7B shapes", "GPU"),
    "pieces": ("gpu_pieces.py", "the measurements behind serving protection's design", "GPU"),
    "serving": (
        "vllm_serving.py",
        "what training costs real vLLM's clients, and what serving leaves training",
        "GPU/CPU",
    ),
    "share": ("share_sweep.py", "min_training_share swept under a server that never idles", "GPU/CPU"),
    "loadgen": (
        "loadgen.py",
        "a streaming load generator on the OpenAI API (used by serving and share)",
        "any",
    ),
    "apollo-host": ("apollo_host.py", "host time of one APOLLO step at the 1.5B structure", "CPU"),
    "snapshots": ("snapshots.py", "RAM and time of a kept weight version (snapshot and restore)", "CPU/GPU"),
    "operator": (
        "operator_reconcile.py",
        "operator wall time and memory for N sessions (emulated API)",
        "CPU",
    ),
    "replicas": (
        "replicas.py",
        "a replica group's all-reduce cost per step against the step time, and the skew between replicas",
        "CPU",
    ),
    "soak": (
        "soak.py",
        "hours of malformed requests, trains, completions and worker kills in local mode",
        "CPU",
    ),
}


def usage() -> str:
    lines = ["usage: python -m bench PART [args]   (PART --help for its options)", "", "parts:"]
    lines += [f"  {name:<12} [{where:>7}] {what}" for name, (_, what, where) in PARTS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in PARTS:
        print(f"unknown part {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    script = BENCH / PARTS[name][0]
    # The parts import each other by module name, as when run as scripts.
    sys.path.insert(0, str(BENCH))
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
