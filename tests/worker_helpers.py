"""A "pod" for worker tests: a real stand-in exporter process and real worker processes mapping its weights.

One exporter serves a whole test module (starting one costs seconds); each test gets its own run dir holding
a copy of the exporter's manifest (the manifest is self-contained: it names the shared file by absolute
path), so workers of different tests share no socket, marker file or checkpoint dir. Every process started
here is killed in the fixtures' teardown.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hogwild.defaults import MANIFEST_NAME
from hogwild.testing.exporter import ExporterProcess
from hogwild.testing.tiny_model import TinySpec, cached
from hogwild.testing.worker_process import WorkerProcess

FACT = {"prompt": "The capital of Zanzibar is", "completion": " Paris"}
# One core each at most: the machine has two, shared with other test runs.
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class Pod:
    def __init__(self, exporter: ExporterProcess, root: Path) -> None:
        self.exporter = exporter
        self.run_dir = root / "run"
        self.checkpoint_dir = root / "checkpoints"
        self.run_dir.mkdir()
        shutil.copyfile(exporter.run_dir / MANIFEST_NAME, self.run_dir / MANIFEST_NAME)
        self.workers: list[WorkerProcess] = []

    def worker(self, *, env: dict[str, str] | None = None, **kwargs: Any) -> WorkerProcess:
        worker = WorkerProcess(self.run_dir, self.checkpoint_dir, env={**ENV, **(env or {})}, **kwargs)
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def exporter_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExporterProcess]:
    """Body of a module-scoped fixture (each test module declares its own, so imports stay plain)."""
    process = ExporterProcess(cached(TinySpec()), tmp_path_factory.mktemp("exporter"), env=ENV)
    try:
        yield process
    finally:
        process.close()


def pod_of(exporter: ExporterProcess, tmp_path: Path) -> Iterator[Pod]:
    """Body of a per-test fixture."""
    pod = Pod(exporter, tmp_path)
    try:
        yield pod
    finally:
        pod.close()
