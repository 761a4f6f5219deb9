"""The Kubernetes area: the operator (the product's `hogwild operator`, started with the chart's rendered
command and args), the CRD and its admission, the chart, monitoring, and the real-cluster suite (`-m e2e`,
run against whatever KUBECONFIG names)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from operator_helpers import EmulatorCluster, KubectlCluster, open_cluster


@pytest.fixture(params=["cluster", pytest.param("real", marks=pytest.mark.e2e)], ids=["emulator", "real"])
async def cluster(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[EmulatorCluster | KubectlCluster]:
    """kopf's emulator (cluster-wide watch), and the real cluster when KUBECONFIG is set."""
    async with open_cluster(request.param, tmp_path) as opened:
        yield opened
