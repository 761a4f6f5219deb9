"""The GPU bench's clock and power sampling (`bench/gpu_clocks.py`) and the strict-yield ceiling each
interference row carries (`bench/gpu_interference.py`). CPU-only: no GPU here, so the sampler's process is a
stand-in shell script printing nvidia-smi's CSV lines; parsing and window summaries are pure."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from gpu_clocks import ClockSampler, Sample, parse_line, summarize
from gpu_interference import strict_yield_figures


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("1755, 2619, 698.41, 61, 0x0000000000000004", Sample(1.0, 1755, 2619, 698.41, 61, 0x4)),
        ("1980, 2619, 312.07, 48, 0x0000000000000000\n", Sample(1.0, 1980, 2619, 312.07, 48, 0)),
        ("345, 2619, 71.2, 35, 0x1", Sample(1.0, 345, 2619, 71.2, 35, 0x1)),
        (
            "clocks.sm [MHz], clocks.mem [MHz], power.draw [W], temperature.gpu, clocks_event_reasons.active",
            None,
        ),
        ("1755, 2619, [N/A], 61, 0x4", None),  # a field the driver could not read
        ("1755, 2619, 698.41, 61", None),  # a field missing
        ('Field "clocks_event_reasons.active" is not a valid field to query.', None),
        ("", None),
    ],
)
def test_nvidia_smi_lines_parse_or_are_skipped(line: str, expected: Sample | None) -> None:
    assert parse_line(line, 1.0) == expected


def _sample(at_s: float, sm: float, power: float, reasons: int = 0) -> Sample:
    return Sample(at_s, sm, 2619, power, 60, reasons)


SAMPLES = [
    _sample(0.5, 1980, 300),  # before the window
    _sample(1.0, 1980, 400),
    _sample(1.1, 1755, 690, 0x4),
    _sample(1.2, 1740, 700, 0x4),
    _sample(1.3, 1755, 695, 0x4 | 0x20),
    _sample(2.5, 1980, 200),  # after it
]


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("samples", 4),
        ("sm_mhz_median", 1755),
        ("sm_mhz_min", 1740),
        ("power_w_median", 692.5),
        ("power_w_max", 700),
        ("sw_power_cap_share", 0.75),
        ("sw_thermal_share", 0.25),
        ("idle_share", 0.0),
    ],
)
def test_a_window_summarizes_only_its_own_samples(field: str, expected: float) -> None:
    assert summarize(SAMPLES, 1.0, 2.0)[field] == pytest.approx(expected)


def test_a_window_without_samples_says_so() -> None:
    assert summarize(SAMPLES, 3.0, 4.0) == {"samples": 0}


def _stand_in_nvidia_smi(directory: Path, body: str) -> None:
    script = directory / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize(
    ("body", "available", "samples"),
    [
        # Two good lines, one the driver could not fill: two samples.
        (
            'echo "1755, 2619, 698.4, 61, 0x4"\necho "1760, 2619, [N/A], 61, 0x4"\n'
            'echo "1980, 2619, 300.0, 50, 0x0"\nsleep 30\n',
            True,
            2,
        ),
        # A driver that refuses the query: no samples, and the refusal is kept for the log.
        ('echo "Field \\"clocks_event_reasons.active\\" is not a valid field to query."\n', False, 0),
    ],
)
def test_the_sampler_reads_the_tool_s_lines_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, available: bool, samples: int
) -> None:
    _stand_in_nvidia_smi(tmp_path, body)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    sampler = ClockSampler(time.monotonic)
    try:
        deadline = time.monotonic() + 10
        while len(sampler.samples) + len(sampler.refused) < samples + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        window = sampler.window(0.0, time.monotonic())
        assert sampler.available is available
        assert window["samples"] == samples
        if not available:
            assert "not a valid field" in window["refused"][0]
    finally:
        sampler.close()


def test_without_nvidia_smi_the_sampler_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    sampler = ClockSampler(time.monotonic)
    assert not sampler.available
    assert sampler.window(0.0, 1e12) == {"samples": 0}
    sampler.close()


@pytest.mark.parametrize(
    ("busy_fraction", "loaded_rate", "idle_rate", "ceiling", "of_ceiling"),
    [
        (0.50, 4_700.0, 9_400.0, 0.50, 1.0),  # kept 0.5 where serving left exactly half: at the ceiling
        (0.50, 4_680.0, 9_400.0, 0.50, 0.99574),
        (0.40, 4_700.0, 9_400.0, 0.60, 0.83333),
        (0.46, 14_000.0, 23_000.0, 0.54, 1.12721),  # a host-bound trainer catches up on its queue: above it
        (0.50, 4_700.0, 0.0, 0.50, None),  # no idle-server rate: no ratio
    ],
)
def test_the_strict_yield_ceiling_is_what_serving_leaves(
    busy_fraction: float, loaded_rate: float, idle_rate: float, ceiling: float, of_ceiling: float | None
) -> None:
    kept = loaded_rate / idle_rate if idle_rate else None  # as the interference row computes it
    figures = strict_yield_figures({"busy_fraction": busy_fraction, "service_p50_ms": 62.7}, kept)
    assert figures["strict_yield_ceiling"] == pytest.approx(ceiling)
    assert figures["serve_service_p50_ms"] == 62.7
    if of_ceiling is None:
        assert figures["kept_of_ceiling"] is None
    else:
        assert figures["kept_of_ceiling"] == pytest.approx(of_ceiling, rel=1e-4)
