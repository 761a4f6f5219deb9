"""CUDA IPC: the worker's HF module over a GPU exporter's weights, and training and checkpoints through it.

Real: a stand-in exporter process holding the weights on the GPU in vLLM's layout and exporting CUDA IPC
handles exactly as the vLLM plugin does; the worker's mapping, trainer and checkpoint code in this process.
Skipped without CUDA.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hogwild import checkpoint
from hogwild.config import TrainingConfig
from hogwild.handles import read_manifest
from hogwild.protocol import TrainRequest
from hogwild.testing.exporter import ExporterProcess
from hogwild.testing.tiny_model import TinySpec, cached
from hogwild.worker.model import MappedModel, load_tokenizer, map_model
from hogwild.worker.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
FACT = {"prompt": "The capital of Zanzibar is", "completion": " Paris"}


class GpuPod:
    def __init__(self, run_dir: Path, tied: bool) -> None:
        self.model_dir = cached(TinySpec(family="qwen2", tied=tied))
        self.exporter = ExporterProcess(self.model_dir, run_dir, device="cuda")
        manifest = read_manifest(run_dir)
        assert manifest is not None and manifest.backend == "cuda_ipc"
        torch.cuda.synchronize()
        self.allocated_before = torch.cuda.memory_allocated()
        self.mapped: MappedModel = map_model(manifest)
        self.allocated_after = torch.cuda.memory_allocated()


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def gpu_pod(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GpuPod]:
    pod = GpuPod(tmp_path, request.param)
    try:
        yield pod
    finally:
        pod.mapped = None  # type: ignore[assignment]  # drop the IPC mappings before the exporter exits
        torch.cuda.synchronize()
        pod.exporter.close()


def test_every_parameter_is_the_exporters_gpu_memory(gpu_pod: GpuPod) -> None:
    ranges = [
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in gpu_pod.mapped.exported.values()
    ]
    for name, param in gpu_pod.mapped.module.named_parameters(remove_duplicate=False):
        assert param.is_cuda, name
        start, end = param.data_ptr(), param.data_ptr() + param.numel() * param.element_size()
        assert any(lo <= start and end <= hi for lo, hi in ranges), name
    # Only the rebuilt rotary buffers are the worker's own allocation; the weights are not.
    assert gpu_pod.allocated_after - gpu_pod.allocated_before < 0.05 * gpu_pod.mapped.weight_bytes


def test_training_on_the_gpu_lands_in_the_exporter(gpu_pod: GpuPod) -> None:
    mapped = gpu_pod.mapped
    trainer = Trainer(TrainingConfig(lr=1e-2))
    trainer.attach(mapped.module, load_tokenizer(gpu_pod.model_dir), mapped.module.config.vocab_size)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    before = gpu_pod.exporter.checksum(name)
    request = TrainRequest.from_body({"samples": [FACT], "steps": 6})
    losses = trainer.train(request, should_stop=lambda: None, rest=time.sleep).reply()["losses"]
    assert losses[-1] < losses[0] / 4, losses
    assert gpu_pod.exporter.checksum(name)["sha256"] != before["sha256"]
    ids = [1, 5, 9, 33, 70]
    served = torch.tensor(gpu_pod.exporter.command("logits", input_ids=ids)["logits"])
    with torch.no_grad():
        trained = mapped.module(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1].float().cpu()
    torch.testing.assert_close(served, trained, rtol=3e-2, atol=3e-2)


def test_a_gpu_checkpoint_loads_and_restores_in_place(gpu_pod: GpuPod, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    mapped = gpu_pod.mapped
    tensors: dict[str, Any] = mapped.checkpoint_tensors()
    written = checkpoint.write(
        tmp_path / "ckpt",
        step=1,
        weights=tensors,
        optimizer_state={},
        model_dir=str(gpu_pod.model_dir),
        meta={},
    )
    saved = gpu_pod.exporter.checksum("model.layers.1.mlp.gate_up_proj.weight")
    with torch.no_grad():
        mapped.module.model.layers[1].mlp.up_proj.weight.mul_(3.0)
    assert gpu_pod.exporter.checksum("model.layers.1.mlp.gate_up_proj.weight") != saved
    checkpoint.load_weights_into(written.checkpoint, tensors)
    assert gpu_pod.exporter.checksum("model.layers.1.mlp.gate_up_proj.weight") == saved
    AutoModelForCausalLM.from_pretrained(written.checkpoint.path)
