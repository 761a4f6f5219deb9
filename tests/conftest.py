"""Fixtures every area shares. The tests live in one directory per area, each with a conftest.py of its own:

    kube/       the operator (kopf, through `hogwild operator` as the chart starts it), the CRD, the chart,
                monitoring, and the real-cluster suite (`-m e2e`)
    worker/     the training worker: batches, the trainer, checkpoints, protection, the replica group
    serving/    the vLLM plugin and local mode on the real engine (`slow`), the protocol, reliability
    optim/      APOLLO, stochastic rounding and the Triton kernels (`gpu` where they need CUDA)
    benchmarks/ the bench suite's own checks (never its figures)

Helpers imported by several areas (operator_helpers, worker_helpers, vllm_helpers, ...) stay in this
directory, which pyproject puts on the path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hogwild.testing.exporter import ExporterProcess
from worker_helpers import Pod, exporter_process, pod_of


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExporterProcess]:
    """A stand-in exporter per module: the tiny model's weights in shared memory, as the plugin exports them."""
    yield from exporter_process(tmp_path_factory)


@pytest.fixture
def pod(exporter: ExporterProcess, tmp_path: Path) -> Iterator[Pod]:
    """A run dir of its own holding the exporter's manifest, and the workers a test starts in it."""
    yield from pod_of(exporter, tmp_path)
