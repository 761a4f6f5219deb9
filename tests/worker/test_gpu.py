"""On a GPU: the worker maps a real exporter process's CUDA memory (no copy), and one training step is right.

Real: the stand-in exporter process (`hogwild.testing.exporter`, exporting through CUDA IPC exactly as the
vLLM plugin does), the manifest, the worker's mapping (`hogwild.worker.model.map_model`) and training step
(`hogwild.worker.trainer.Trainer`, APOLLO). The float64 reference is the paper's update written out in
`bench/gpu_reference.py`. Skipped without CUDA.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from gpu_reference import FP32_MAX, ApolloSettings, reference_apollo, relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (an NVIDIA GPU)"),
]


class Mapped:
    """An exporter process holding a tiny model on the GPU, and this process's mapping of its weights."""

    def __init__(self, root: Path, *, tied: bool, dtype: str) -> None:
        from hogwild.handles import read_manifest
        from hogwild.testing.exporter import ExporterProcess
        from hogwild.testing.tiny_model import TinySpec, cached
        from hogwild.worker.model import map_model

        model_dir = cached(TinySpec(family="qwen2", tied=tied, dtype=dtype), cache_dir=root / "models")
        self.run_dir = root / "run"
        self.run_dir.mkdir()
        self.exporter = ExporterProcess(model_dir, self.run_dir, device="cuda")
        manifest = read_manifest(self.run_dir)
        assert manifest is not None and manifest.backend == "cuda_ipc"
        torch.zeros(1, device="cuda")  # the CUDA context exists before counting
        before = torch.cuda.memory_allocated()
        self.mapped = map_model(manifest)
        torch.cuda.synchronize()
        self.allocated_bytes = torch.cuda.memory_allocated() - before

    def close(self) -> None:
        self.exporter.close()


@pytest.fixture(scope="module")
def tied_bf16(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mapped]:
    setup = Mapped(tmp_path_factory.mktemp("tied-bf16"), tied=True, dtype="bfloat16")
    yield setup
    setup.close()


@pytest.fixture(scope="module")
def untied_fp32(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mapped]:
    setup = Mapped(tmp_path_factory.mktemp("untied-fp32"), tied=False, dtype="float32")
    yield setup
    setup.close()


def _inside(tensor: torch.Tensor, exported: dict[str, torch.Tensor]) -> bool:
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    return any(
        e.data_ptr() <= start and end <= e.data_ptr() + e.numel() * e.element_size()
        for e in exported.values()
    )


def test_every_parameter_lies_in_the_exporters_cuda_memory(tied_bf16: Mapped) -> None:
    module = tied_bf16.mapped.module
    outside = [
        n
        for n, p in module.named_parameters(remove_duplicate=False)
        if not _inside(p, tied_bf16.mapped.exported)
    ]
    assert outside == []
    assert all(p.is_cuda for p in module.parameters())


def test_mapping_allocates_no_copy_of_the_weights(tied_bf16: Mapped) -> None:
    # Only rotary buffers and the like: far below 5 % of the weights.
    assert tied_bf16.allocated_bytes < 0.05 * tied_bf16.mapped.weight_bytes


@pytest.mark.parametrize(
    ("hf_name", "index"),
    [
        pytest.param("model.layers.0.self_attn.q_proj.weight", 5, id="q-rows-of-qkv"),
        pytest.param("model.layers.1.self_attn.k_proj.weight", 7, id="k-rows-of-qkv"),
        pytest.param("model.layers.0.mlp.up_proj.weight", 3, id="up-rows-of-gate_up"),
        pytest.param("model.embed_tokens.weight", 11, id="tied-embedding"),
    ],
)
def test_a_write_through_the_worker_is_read_by_the_exporter(
    tied_bf16: Mapped, hf_name: str, index: int
) -> None:
    from hogwild.handles import read_manifest

    manifest = read_manifest(tied_bf16.run_dir)
    assert manifest is not None
    view = next(v for v in manifest.views if v.name == hf_name)
    row_offset = view.rows[0] if view.rows else 0
    param = dict(tied_bf16.mapped.module.named_parameters(remove_duplicate=False))[hf_name]
    columns = param.shape[1]
    with torch.no_grad():
        param.view(-1)[index] = 1.5 + index
    torch.cuda.synchronize()
    flat_index = row_offset * columns + index
    assert tied_bf16.exporter.command("read", name=view.source, index=flat_index)["value"] == 1.5 + index


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).reshape(-1).numpy().tobytes()).hexdigest()


def _reference_loss_and_grads(
    mapped: Any, weights: dict[str, torch.Tensor], ids: torch.Tensor
) -> tuple[float, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(mapped.module.config, dtype=torch.float64)
    model.load_state_dict(weights, strict=True)
    model.train()
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    targets = ids[:, 1:].numel()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / targets
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach() for n, p in model.named_parameters()}


def test_one_training_step_matches_the_float64_reference(untied_fp32: Mapped) -> None:
    from hogwild.config import config_from_dict
    from hogwild.optim import Apollo
    from hogwild.worker.batches import MicroBatch, StepBatch
    from hogwild.worker.trainer import Trainer

    mapped = untied_fp32.mapped
    trainer = Trainer(config_from_dict({"optimizer": "apollo", "lr": 1e-3, "clip_grad_norm": 1.0}))
    trainer.attach(mapped.module, None, int(mapped.module.config.vocab_size))
    ids = torch.randint(0, int(mapped.module.config.vocab_size), (2, 64), device="cuda")
    batch = StepBatch((MicroBatch(ids, ids, torch.ones_like(ids)),), ids.numel(), ids[:, 1:].numel(), 0)
    names = dict(mapped.module.named_parameters())
    before = {n: p.detach().clone() for n, p in names.items()}
    exporter_before = untied_fp32.exporter.checksum("model.layers.0.mlp.gate_up_proj.weight")["sha256"]

    stats = trainer.step(batch)

    ref_loss, ref_grads = _reference_loss_and_grads(mapped, {n: w.double() for n, w in before.items()}, ids)
    assert not stats.skipped
    assert abs(stats.loss - ref_loss) / abs(ref_loss) < 1e-5
    # The trainer clips the gradient to norm 1 before the step, as the reference does here.
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref_grads.values()]))
    clip = min(1.0, 1.0 / (float(norm) + 1e-6))
    optimizer = trainer.optimizer
    assert isinstance(optimizer, Apollo)
    group = optimizer.param_groups[0]
    errors = {}
    for name, param in names.items():
        if not Apollo.projects(param, group):
            continue  # AdamW inside APOLLO; its first step is sign(g), which a float64 check cannot pin down
        seed = optimizer.state[param]["seed"]
        reference = reference_apollo(before[name], [ref_grads[name] * clip], seed, ApolloSettings(lr=1e-3))
        errors[name] = relative_error(
            param.detach().double() - before[name].double(), reference - before[name].double()
        )
    assert len(errors) >= 10, "the tiny model must have projected weights to compare"
    assert max(errors.values()) < FP32_MAX, errors
    # What the worker wrote is what the exporter now serves, byte for byte.
    exporter_after = untied_fp32.exporter.checksum("model.layers.0.mlp.gate_up_proj.weight")["sha256"]
    assert exporter_after != exporter_before
    assert exporter_after == _digest(mapped.exported["model.layers.0.mlp.gate_up_proj.weight"])
