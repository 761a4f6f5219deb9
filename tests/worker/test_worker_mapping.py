"""The worker's HF module is built over the exported weights themselves: views, never copies.

Real: tiny generated models of every supported family (tied and untied embeddings), laid out exactly as
vLLM 0.32 holds them (fused qkv_proj / gate_up_proj, vocab padded to 64 rows), exported through the same
shared-memory path the vLLM plugin uses, the manifest, the worker's mapping code and transformers' model
classes. The table cases export and map inside the test process, but through two independent mappings of the
shared file (as two processes would); the last cases run a real exporter process and measure the worker
process's own memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hogwild.handles import Manifest
from hogwild.testing.children import child_env
from hogwild.testing.exporter import ExporterProcess, export, load_vllm_params
from hogwild.testing.tiny_model import TinySpec, cached
from hogwild.testing.vllm_layout import fused_forward
from hogwild.worker.model import MappedModel, map_model

FAMILIES = [
    pytest.param(family, tied, id=f"{family}-{'tied' if tied else 'untied'}")
    for family in ("llama", "qwen2", "qwen3", "mistral")
    for tied in (True, False)
]


class Exported:
    """The exporter's side (its parameters, rebound onto the shared file) and the worker's mapping of it."""

    def __init__(self, model_dir: Path, run_dir: Path) -> None:
        self.model_dir = model_dir
        self.params, self.hf_config = load_vllm_params(str(model_dir), "cpu")
        self.manifest: Manifest = export(self.params, str(model_dir), str(run_dir), self.hf_config)
        self.mapped: MappedModel = map_model(self.manifest)

    def rows(self, name: str) -> int:
        return int(self.hf_config[name])


@pytest.fixture(params=[pytest.param(case.values, id=case.id) for case in FAMILIES])
def exported(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Exported]:
    family, tied = request.param
    setup = Exported(cached(TinySpec(family=family, tied=tied)), tmp_path)
    yield setup
    os.unlink(setup.manifest.payload)  # the mappings stay valid; the file name goes


def _ranges(tensors: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors.values()]


def test_every_parameter_lies_inside_an_exported_tensor(exported: Exported) -> None:
    ranges = _ranges(exported.mapped.exported)
    outside = []
    for name, param in exported.mapped.module.named_parameters(remove_duplicate=False):
        start, end = param.data_ptr(), param.data_ptr() + param.numel() * param.element_size()
        if not any(lo <= start and end <= hi for lo, hi in ranges):
            outside.append(name)
    assert outside == []


def test_the_exporter_and_the_worker_map_different_addresses(exported: Exported) -> None:
    """Guards the other tests: a write seen on both sides then went through the shared file, not one pointer."""
    worker = set(_ranges(exported.mapped.exported))
    exporter = set(_ranges(dict(exported.params)))
    assert worker.isdisjoint(exporter)


# (HF parameter, element written through the worker, vLLM tensor, where the exporter must see it).
# Row offsets come from the config: k_proj follows the q rows inside qkv_proj, up_proj the gate rows.
WRITES = [
    pytest.param("model.layers.0.self_attn.k_proj.weight", (0, 1), "model.layers.0.self_attn.qkv_proj.weight", lambda c: (c["num_attention_heads"] * c["head_dim"], 1), id="k_proj-in-qkv"),
    pytest.param("model.layers.1.self_attn.v_proj.weight", (-1, 2), "model.layers.1.self_attn.qkv_proj.weight", lambda c: (-1, 2), id="v_proj-last-row"),
    pytest.param("model.layers.0.mlp.up_proj.weight", (0, 3), "model.layers.0.mlp.gate_up_proj.weight", lambda c: (c["intermediate_size"], 3), id="up_proj-in-gate_up"),
    pytest.param("model.embed_tokens.weight", (5, 0), "model.embed_tokens.weight", lambda c: (5, 0), id="embed_tokens"),
    pytest.param("lm_head.weight", (7, 4), "lm_head.weight", lambda c: (7, 4), id="lm_head"),
    pytest.param("model.norm.weight", (3,), "model.norm.weight", lambda c: (3,), id="final-norm"),
]  # fmt: skip


@pytest.mark.parametrize(("hf_name", "index", "vllm_name", "vllm_index"), WRITES)
def test_a_write_through_the_worker_module_lands_in_the_exporters_tensor(
    exported: Exported, hf_name: str, index: tuple[int, ...], vllm_name: str, vllm_index: Any
) -> None:
    module = exported.mapped.module
    if vllm_name == "lm_head.weight" and "lm_head.weight" not in exported.params:
        vllm_name = "model.embed_tokens.weight"  # tied: vLLM has no lm_head, the embedding serves as one
    param = module.get_parameter(hf_name)
    with torch.no_grad():
        param[index] = 3.5
    assert float(exported.params[vllm_name][vllm_index(exported.hf_config)]) == 3.5


def test_the_worker_module_computes_what_the_plain_hf_model_computes(exported: Exported) -> None:
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(exported.model_dir)
    ids = torch.randint(0, exported.rows("vocab_size"), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported.mapped.module(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_the_stand_in_exporter_computes_with_vllms_layout_what_hf_computes(exported: Exported) -> None:
    """The fused layout itself is right: a forward that reads only the fused tensors agrees with HF."""
    ids = torch.randint(0, exported.rows("vocab_size"), (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf = exported.mapped.module(input_ids=ids).logits
    torch.testing.assert_close(fused_forward(exported.params, exported.hf_config, ids), hf)


# ---- with a real exporter process ---------------------------------------------------------------------
@pytest.mark.parametrize(("family", "tied"), [FAMILIES[3], FAMILIES[0]])
def test_an_exporter_process_serves_what_the_worker_wrote(family: str, tied: bool, tmp_path: Path) -> None:
    from hogwild.handles import read_manifest

    exporter = ExporterProcess(cached(TinySpec(family=family, tied=tied)), tmp_path)
    try:
        manifest = read_manifest(tmp_path)
        assert manifest is not None
        mapped = map_model(manifest)
        name = "model.layers.0.mlp.gate_up_proj.weight"
        before = exporter.checksum(name)
        with torch.no_grad():
            mapped.module.get_parameter("model.layers.0.mlp.gate_proj.weight").mul_(-2.0)
        assert exporter.checksum(name)["sha256"] != before["sha256"]
        ids = [1, 5, 9, 33, 70]
        served = torch.tensor(exporter.command("logits", input_ids=ids)["logits"])
        with torch.no_grad():
            trained = mapped.module(input_ids=torch.tensor([ids])).logits[0, -1].float()
        torch.testing.assert_close(served, trained, rtol=2e-2, atol=2e-2)
    finally:
        exporter.close()


USS_PROBE = """
import gc, json, sys, psutil, torch
from transformers import AutoConfig, AutoModelForCausalLM
from hogwild.handles import read_manifest
from hogwild.worker.model import map_model

manifest = read_manifest(sys.argv[1])
# Warm up what the first model build imports and allocates once, so only the mapping itself is measured.
with torch.device("meta"):
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(manifest.model_path))
gc.collect()
process = psutil.Process()
before = process.memory_full_info().uss
mapped = map_model(manifest)
with torch.no_grad():
    for p in mapped.module.parameters():
        p.sum()  # touch every page: the worker now has all of the weights mapped in
gc.collect()
after = process.memory_full_info().uss
print(json.dumps({"uss_growth_bytes": after - before, "weight_bytes": mapped.weight_bytes}))
"""


def test_mapping_allocates_no_second_copy_of_the_weights(tmp_path: Path) -> None:
    """The worker process's unique memory (USS) grows by < 5 % of the weights when it maps and reads them all."""
    spec = TinySpec(
        family="qwen2", tied=False, hidden_size=1024, layers=4, heads=16, kv_heads=4, intermediate_size=4096
    )
    exporter = ExporterProcess(cached(spec), tmp_path)
    try:
        probe = subprocess.run(
            [sys.executable, "-c", USS_PROBE, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
            env=child_env(),
        )
    finally:
        exporter.close()
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["weight_bytes"] > 100_000_000  # big enough that the weights dominate the process
    assert result["uss_growth_bytes"] < 0.05 * result["weight_bytes"], result


def test_prewarm_imports_loads_the_model_families_a_fresh_process_lacks() -> None:
    """In a fresh interpreter, so that what other tests imported cannot make it pass."""
    code = (
        "import sys, json\n"
        "from hogwild.worker.model import PREWARM_FAMILIES, prewarm_imports\n"
        "names = [f'transformers.models.{f}.modeling_{f}' for f in PREWARM_FAMILIES]\n"
        "before = [n for n in names if n in sys.modules]\n"
        "loaded = prewarm_imports()\n"
        "print(json.dumps({'before': before, 'loaded': loaded, 'after': [n for n in names if n in sys.modules]}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True, env=child_env()
    )
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["before"] == []
    assert seen["loaded"] == seen["after"]
    assert "transformers.models.qwen2.modeling_qwen2" in seen["after"]
    assert "transformers.models.llama.modeling_llama" in seen["after"]
