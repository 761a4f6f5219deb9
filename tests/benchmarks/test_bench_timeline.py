"""The GPU bench's collision report (`bench/gpu_timeline.py`): pure joins of two timelines, and the labels the
point recorder gives. CPU-only: the inputs are made-up timestamps and a tiny torch module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from gpu_timeline import PointRecorder, collision_report
from hogwild.worker.protection import install_preemption_points
from hogwild.worker.protection.pieces import in_pieces

# (arrival, launched, done, gpu_ms): three ordinary requests and one that waited 5 ms for the GPU.
REQUESTS = [
    (1.000, 1.000, 1.018, 18.0),
    (1.036, 1.036, 1.054, 18.0),
    (1.072, 1.073, 1.096, 18.0),  # 1 ms late, then 5 ms before its GPU work ran
    (1.108, 1.108, 1.126, 18.0),
]
POINTS = [
    (0.999, 0.999, "fwd:a"),
    (1.035, 1.035, "optim(8, 8)x2"),
    (1.0725, 1.0725, "bwd(4, 8)"),
    (1.074, 1.080, "bwd(4, 8)"),  # waited 6 ms there
    (1.107, 1.107, "fwd:a"),
]


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("latency_ms", 24.0),
        ("late_ms", 1.0),
        ("before_gpu_ms", 5.0),
        ("gpu_extra_ms", 0.0),
    ],
)
def test_slowest_request_time_split(field: str, expected: float) -> None:
    slowest = collision_report(REQUESTS, POINTS, slowest=1)["slow"][0]
    assert slowest[field] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("last_labels_all", {"fwd:a": 2, "optim(8, 8)x2": 1, "bwd(4, 8)": 1}),
        ("requests", 4),
        ("points", 5),
    ],
)
def test_report_counts(key: str, expected: object) -> None:
    assert collision_report(REQUESTS, POINTS)[key] == expected


def test_slow_request_lists_the_points_around_its_launch() -> None:
    """Points from window_ms before the launch to the completion, relative to the launch, with time held."""
    trail = collision_report(REQUESTS, POINTS, slowest=1, window_ms=1.0)["slow"][0]["trainer"]
    assert [(label, held) for _, label, held in trail] == [("bwd(4, 8)", 0.0), ("bwd(4, 8)", 6.0)]
    assert trail[0][0] == pytest.approx(-0.5)


def test_empty_window() -> None:
    assert collision_report([], POINTS) == {"requests": 0}


FUNCTION = "test_recorder_labels_module_hooks_and_callers"


def test_recorder_labels_module_hooks_and_callers() -> None:
    """Forward hooks are named by module, backward hooks by gradient shape, direct calls by their caller."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    calls: list[int] = []
    clock = iter(range(1000))
    recorder = PointRecorder(lambda: calls.append(1), model, lambda: float(next(clock)))
    recorder.recording = True
    remove = install_preemption_points(_Wrapped(model), recorder, "layer", embeddings=False)
    try:
        model(torch.randn(5, 4, requires_grad=True)).sum().backward()

        def clip_piece() -> None:
            recorder()

        clip_piece()
        for _ in in_pieces([1, 2, 3], 2, recorder):  # a piece helper's point is named by its consumer
            pass
    finally:
        remove()
    labels = [label for _, _, label in recorder.take(0.0, 1e9)]
    assert labels == ["fwd:0", "fwd:1", "bwd(5, 2)", "bwd(5, 3)", "clip_piece", *2 * [FUNCTION]]
    assert len(calls) == len(labels)
    assert recorder.take(0.0, 1e9) == []


class _Wrapped(torch.nn.Module):
    """`model.layers` as protection's `decoder_layers` finds it, over the Sequential's two linears."""

    def __init__(self, inner: torch.nn.Sequential) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(list(inner))
