"""Serving protection: the load hint the server writes, and the trainer's preemption points that read it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from hogwild.config import ServingProtection
from hogwild.worker.protection import (
    HintFileProbe,
    LoadHint,
    ServingGate,
    install_preemption_points,
    parse_vllm_load,
)


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
        pytest.param("layer", 3 + 1, id="layers-and-head"),
        pytest.param("linear", 3 + 3 * 7 + 1, id="every-projection-too"),
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
