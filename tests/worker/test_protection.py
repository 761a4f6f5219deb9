"""Serving protection: the load hint the server writes, and the trainer's preemption points that read it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from hogwild.config import ServingProtection
from hogwild.load_hint import LoadHint
from hogwild.worker.protection import ServingGate, install_preemption_points
from hogwild.worker.protection.probes import HintFileProbe, parse_vllm_load
from model_helpers import tiny_qwen2


class Fixed:
    def __init__(self, busy: bool) -> None:
        self.value = busy

    def busy(self) -> bool:
        return self.value


@pytest.mark.parametrize(
    ("active", "busy"), [pytest.param(0, False, id="idle"), pytest.param(3, True, id="busy")]
)
def test_the_trainer_reads_what_the_server_writes(tmp_path: Path, active: int, busy: bool) -> None:
    hint = LoadHint(tmp_path / "serving-load")
    hint.set(active)
    assert HintFileProbe(tmp_path / "serving-load").busy() is busy
    hint.close()


def test_a_missing_or_foreign_hint_reads_as_idle(tmp_path: Path) -> None:
    assert HintFileProbe(tmp_path / "absent").busy() is False
    (tmp_path / "foreign").write_bytes(os.urandom(64))
    assert HintFileProbe(tmp_path / "foreign").busy() is False


def test_a_hint_left_busy_by_a_dead_writer_goes_stale(tmp_path: Path) -> None:
    hint = LoadHint(tmp_path / "serving-load")
    hint.set(1)
    probe = HintFileProbe(tmp_path / "serving-load", stale_s=0.05)
    assert probe.busy() is True
    time.sleep(0.1)
    assert probe.busy() is False


def test_vllm_metrics_count_running_and_waiting_requests() -> None:
    text = (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n'
        'vllm:num_requests_swapped{engine="0",model_name="m"} 5.0\n'
    )
    assert parse_vllm_load(text) == 3


@pytest.mark.parametrize(
    ("settings", "busy", "waits"),
    [
        pytest.param(ServingProtection(yield_when_busy=False), True, 0, id="off-never-waits"),
        pytest.param(ServingProtection(yield_when_busy=True, max_wait_s=0.05), False, 0, id="idle-server"),
        pytest.param(ServingProtection(yield_when_busy=True, max_wait_s=0.05), True, 1, id="busy-server"),
    ],
)
def test_a_point_waits_only_while_the_server_is_busy(
    settings: ServingProtection, busy: bool, waits: int
) -> None:
    gate = ServingGate(Fixed(busy), settings)
    started = time.monotonic()
    gate.point()
    assert gate.stats.waits == waits
    assert (time.monotonic() - started >= 0.05) is bool(waits)


class FakeEvent:
    """A CUDA event stand-in (the queue logic is host code; no GPU here): completes when synchronized, and
    its GPU time since another event is the sum of the chunk lengths between them."""

    def __init__(self, log: list[str], clock: list[float]) -> None:
        self.log, self.clock = log, clock
        self.at = 0.0

    def record(self) -> None:
        self.at = self.clock[0]

    def synchronize(self) -> None:
        self.log.append(f"sync@{self.at:g}")

    def elapsed_time(self, other: FakeEvent) -> float:
        return (other.at - self.at) * 1e3


@pytest.mark.parametrize(
    ("chunk_s", "fixed_depth", "waits_at", "expected_depth"),
    [
        pytest.param(0.0003, None, (), 4, id="short-chunks-queue-deep"),
        pytest.param(0.0015, None, (), 1, id="long-chunks-one-at-a-time"),
        pytest.param(0.0008, None, (), 2, id="budget-over-chunk"),
        pytest.param(0.0015, 3, (), 3, id="fixed-depth-wins"),
        # A wait between points would read as a 20 ms chunk; it is not sampled, so the depth stays.
        pytest.param(0.0003, None, (5, 9), 4, id="waits-not-counted"),
    ],
)
def test_chunk_queue_depth_follows_measured_chunks(
    chunk_s: float, fixed_depth: int | None, waits_at: tuple[int, ...], expected_depth: int
) -> None:
    from hogwild.worker.protection.gate import ChunkQueue

    log: list[str] = []
    clock = [0.0]
    queue = ChunkQueue(budget_s=0.002, fixed_depth=fixed_depth, new_event=lambda: FakeEvent(log, clock))
    assert queue.depth() == (fixed_depth or 2)  # nothing measured yet
    for index in range(20):
        queue.mark()
        if index in waits_at:
            queue.waited()
            clock[0] += 0.020  # the serving step the point waited for
        clock[0] += chunk_s  # the chunk launched after the point
    assert queue.depth() == expected_depth
    assert len(queue._pending) == expected_depth - 1  # after a mark: at most depth - 1 left unfinished
    assert queue.chunk_s == pytest.approx(chunk_s, rel=1e-6) or fixed_depth is not None


def test_chunk_queue_waits_oldest_first() -> None:
    from hogwild.worker.protection.gate import ChunkQueue

    log: list[str] = []
    clock = [0.0]
    queue = ChunkQueue(fixed_depth=2, new_event=lambda: FakeEvent(log, clock))
    for _ in range(4):
        queue.mark()
        clock[0] += 1.0
    assert log == ["sync@0", "sync@1", "sync@2"]  # each point waits for the chunk before the last


def test_a_busy_server_delays_training_at_most_max_wait() -> None:
    gate = ServingGate(Fixed(True), ServingProtection(yield_when_busy=True, max_wait_s=0.02))
    started = time.monotonic()
    gate.point()
    assert time.monotonic() - started < 0.5
    assert gate.stats.gave_up == 1


def test_settings_change_while_training() -> None:
    gate = ServingGate(Fixed(True), ServingProtection(yield_when_busy=False))
    gate.point()
    gate.update(ServingProtection(yield_when_busy=True, max_wait_s=0.01))
    gate.point()
    assert gate.stats.waits == 1


@pytest.mark.parametrize(
    ("granularity", "blocks"),
    [
        pytest.param("layer", 1 + 3 + 1, id="embedding-layers-and-head"),
        pytest.param("linear", 1 + 3 + 3 * 7 + 1, id="every-projection-too"),
    ],
)
def test_points_come_before_each_block_forward_and_backward(granularity: str, blocks: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    calls: list[str] = []
    remove = install_preemption_points(model, lambda: calls.append("point"), granularity)
    ids = torch.randint(0, 100, (1, 8))
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 2 * blocks  # forward and backward
    remove()
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 2 * blocks


@pytest.mark.parametrize("tied", [pytest.param(True, id="tied"), pytest.param(False, id="untied")])
def test_the_chunked_head_gives_the_whole_head_gradients(tied: bool) -> None:
    import torch.nn.functional as F

    from hogwild.worker.protection.pieces import chunked_head_backward

    model = tiny_qwen2(tied=tied)
    ids = torch.randint(0, 300, (2, 150))
    labels = ids.clone()
    labels[0, :40] = -100
    targets = int((labels[:, 1:] != -100).sum())
    logits = model(input_ids=ids).logits
    whole = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum") / targets
    whole.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    points: list[int] = []
    loss = chunked_head_backward(
        model, ids, labels, torch.ones_like(ids), targets, lambda: points.append(1), rows=64
    )
    assert float(loss) == pytest.approx(float(whole.detach()), rel=1e-12)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12)
    assert len(points) == 5  # ceil(2 * 149 / 64) chunks


def test_the_preemptible_clip_matches_torch() -> None:
    from hogwild.worker.protection.pieces import preemptible_clip

    params = [torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float64)) for _ in range(10)]
    for p in params:
        p.grad = torch.randn_like(p)
    expected_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(expected_params, params, strict=True):
        p.grad = q.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(expected_params, 1.0)
    points: list[int] = []
    assert preemptible_clip(params, 1.0, lambda: points.append(1), chunk=3) == pytest.approx(float(norm))
    for p, q in zip(params, expected_params, strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert len(points) == 2 * 4


@pytest.mark.parametrize(
    ("sizes", "sample_limit", "preemptible", "expected_points"),
    [
        ([35, 12, 1, 70] * 10, 1 << 24, True, 2 * 2),  # every element; 40 parameters: 2 pieces a half
        ([35, 12, 1, 70] * 10, 1 << 24, False, 0),  # whole: no points
        ([4096, 1000, 3], 512, True, 2),  # strided: every 11th element, scaled up
        ([], 1 << 24, True, 0),
    ],
)
def test_update_norm_sample(
    monkeypatch: pytest.MonkeyPatch,
    sizes: list[int],
    sample_limit: int,
    preemptible: bool,
    expected_points: int,
) -> None:
    """The sampled update norm is the exact norm of the in-place change when it samples every element, and
    its strided estimate when not; with a point, both halves pass one before each piece, lazily."""
    from hogwild.worker.protection import pieces

    monkeypatch.setattr(pieces, "UPDATE_NORM_SAMPLE_ELEMENTS", sample_limit)
    generator = torch.Generator().manual_seed(len(sizes))
    params = [torch.randn(n, generator=generator).to(torch.bfloat16) for n in sizes]
    before = [p.clone() for p in params]
    events: list[str] = []
    sample = pieces.UpdateNormSample(params, (lambda: events.append("point")) if preemptible else None)
    events.append("step")
    for p in params:
        p.add_(torch.randn(p.shape, generator=generator).to(torch.bfloat16))  # the optimizer, in place
    norm = sample.norm()
    stride = sample.stride
    changes = [(p.float() - b.float())[::stride] for p, b in zip(params, before, strict=True)]
    expected = float(torch.cat(changes).square().sum() * stride) ** 0.5 if changes else 0.0
    assert norm == pytest.approx(expected, rel=1e-5)
    assert stride == (1 if sample_limit >= sum(sizes) else -(-sum(sizes) // sample_limit))
    assert events.count("point") == expected_points
    if expected_points:  # half of the points before the step, half after: none wasted up front
        assert events.index("step") == expected_points // 2


class FakeTime:
    """A clock that only moves when the gate sleeps or the test says so: the share arithmetic, not timing."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(
    ("share", "compute_s", "low", "high"),
    [
        pytest.param(0.1, 0.001, 0.07, 0.13, id="default-share"),
        pytest.param(0.5, 0.001, 0.45, 0.55, id="half"),
        pytest.param(0.1, 0.05, 0.07, 0.13, id="longer-chunks"),
    ],
)
def test_a_server_that_never_idles_still_leaves_training_its_share(
    share: float, compute_s: float, low: float, high: float
) -> None:
    """Always busy: the waits stop once they would take more than 1 - share of the recent time."""
    fake = FakeTime()
    settings = ServingProtection(yield_when_busy=True, max_wait_s=1.0, min_training_share=share)
    gate = ServingGate(Fixed(True), settings, clock=fake.clock, sleep=fake.sleep)
    computed = 0.0
    while fake.now < 120.0:  # many windows
        gate.point()
        fake.now += compute_s  # the chunk the point let through
        computed += compute_s
    assert low <= computed / fake.now <= high
    assert gate.stats.share_kept > 0


def test_a_server_with_idle_gaps_is_not_affected_by_the_share() -> None:
    """Busy half the time in short bursts: every wait runs to the end of the burst, none is cut."""

    class Bursts:
        def busy(self) -> bool:
            return int(fake.now / 0.02) % 2 == 0  # 20 ms busy, 20 ms idle

    fake = FakeTime()
    gate = ServingGate(
        Bursts(), ServingProtection(min_training_share=0.1), clock=fake.clock, sleep=fake.sleep
    )
    while fake.now < 30.0:
        gate.point()
        fake.now += 0.001
    assert gate.stats.waits > 0 and gate.stats.share_kept == 0 and gate.stats.gave_up == 0


def test_share_zero_waits_the_whole_max_wait_every_time() -> None:
    fake = FakeTime()
    settings = ServingProtection(max_wait_s=0.5, min_training_share=0.0)
    gate = ServingGate(Fixed(True), settings, clock=fake.clock, sleep=fake.sleep)
    for _ in range(100):
        gate.point()
    assert gate.stats.gave_up == 100 and gate.stats.share_kept == 0
    assert gate.stats.waited_s == pytest.approx(50.0, rel=1e-3)


@pytest.mark.parametrize(
    ("hint_file", "metrics_url", "probe", "gpu_wait_possible"),
    [
        pytest.param(True, None, "HintFileProbe", True, id="hint-file"),
        pytest.param(True, "http://127.0.0.1:1/metrics", "HintFileProbe", True, id="hint-file-wins"),
        pytest.param(False, "http://127.0.0.1:1/metrics", "MetricsProbe", False, id="no-hint-vllm-metrics"),
        pytest.param(False, None, "HintFileProbe", True, id="no-hint-yet"),
    ],
)
def test_the_worker_s_gate_reads_the_hint_file_or_vllm_s_metrics(
    tmp_path: Path, hint_file: bool, metrics_url: str | None, probe: str, gpu_wait_possible: bool
) -> None:
    """`serving_gate` is the package's face for the worker: the probe it reads, and a GPU-side wait only where
    a hint file (with its gate word) is the source; `close` stops the probe too."""
    from hogwild.load_hint import HINT_NAME
    from hogwild.worker.protection import serving_gate

    writer = LoadHint(tmp_path / HINT_NAME) if hint_file else None
    gate = serving_gate(tmp_path, ServingProtection(), metrics_url)
    try:
        assert type(gate.probe).__name__ == probe
        assert (gate.device_factory is not None) is gpu_wait_possible
    finally:
        gate.close()
        if writer is not None:
            writer.close()
    thread = getattr(gate.probe, "_thread", None)
    if thread is not None:
        thread.join(timeout=2.0)
        assert not thread.is_alive()
