"""Zero-copy tensor sharing between the serving process (exporter) and the trainer (importer).

CPU: one file in /dev/shm, mapped MAP_SHARED by both sides; the exporter copies each parameter in once and
rebinds the parameter as a view of the file, so from then on the file is the serving weight memory.
GPU: CUDA IPC handles of the exporter's own parameter storage (nothing moves; parameters are never rebound,
because CUDA graphs and compiled code hold raw pointers and would silently keep reading the old memory).

Two traps this module avoids (docs/facts.md): pickling `reduce_tensor` of a CPU tensor silently copies it, and
shared-memory files survive SIGTERM, so the exporter unlinks its own and sweeps those of dead exporters.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pickle
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from hogwild.handles import ExporterIdentity, Manifest, ManifestError, TensorEntry, align, build_views
from hogwild.typed_calls import cuda_ipc_handle

SHM_DIR = os.environ.get("HOGWILD_SHM_DIR", "/dev/shm")
SHM_PREFIX = "hogwild-weights-"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ManifestError(f"unknown dtype {name!r}")
    return dtype


def process_start_time(pid: int) -> float:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is still told apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return float(fields[19])
    except (OSError, IndexError, ValueError):
        return 0.0


def current_identity() -> ExporterIdentity:
    pid = os.getpid()
    return ExporterIdentity(pid, process_start_time(pid), uuid.uuid4().hex, socket.gethostname())


def exporter_alive(identity: ExporterIdentity) -> bool:
    return process_start_time(identity.pid) == identity.start_time and identity.start_time > 0


def sweep_stale_shm(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink shm payloads whose exporter process is gone (SIGKILL leaves them behind)."""
    removed = []
    for path in glob.glob(os.path.join(shm_dir, f"{SHM_PREFIX}*")):
        try:
            pid = int(Path(path).name.removeprefix(SHM_PREFIX).split("-")[0])
        except ValueError:
            continue
        if not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed


def export_shm(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    model_path: str,
    hf_config: Mapping[str, Any],
    vllm_version: str = "",
    shm_dir: str = SHM_DIR,
) -> Manifest:
    """Move CPU parameters into one shared file and rebind them as views of it. Returns the manifest."""
    params = [(name, p) for name, p in named_params]
    identity = current_identity()
    entries, offset = [], 0
    for name, p in params:
        offset = align(offset)
        entries.append(TensorEntry(name, dtype_name(p.dtype), tuple(p.shape), offset))
        offset += p.numel() * p.element_size()
    total = align(max(offset, 1))
    path = os.path.join(shm_dir, f"{SHM_PREFIX}{identity.pid}-{identity.nonce}")
    # Owner-only: the file IS the served weights; the worker maps it as the same user.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        os.ftruncate(fd, total)
    finally:
        os.close(fd)
    atexit.register(_unlink_quietly, path)
    buffer = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
    for entry, (_, p) in zip(entries, params, strict=True):
        view = _view(buffer, entry)
        view.copy_(p.data)
        # Rebind: from now on vLLM computes with the shared file's memory (CPU only; see module docstring).
        p.data = view
    dtypes = {e.dtype for e in entries}
    return Manifest(
        backend="shm",
        payload=path,
        exporter=identity,
        model_path=model_path,
        dtype=dtypes.pop() if len(dtypes) == 1 else "mixed",
        tensors=tuple(entries),
        views=build_views({e.name: e.shape for e in entries}, hf_config),
        hf_config=dict(hf_config),
        vllm_version=vllm_version,
        payload_bytes=total,
    )


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def gpu_uuid(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    return f"GPU-{props.uuid}" if getattr(props, "uuid", None) else ""


def export_cuda_ipc(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    run_dir: str | os.PathLike[str],
    model_path: str,
    hf_config: Mapping[str, Any],
    vllm_version: str = "",
) -> Manifest:
    """Write CUDA IPC handles of the parameters' own storage. Nothing is copied or rebound."""
    params = [(name, p) for name, p in named_params]
    identity = current_identity()
    handles = {name: cuda_ipc_handle(p.detach()) for name, p in params}
    path = Path(run_dir) / f"weights-{identity.nonce}.ipc"
    tmp = path.with_suffix(".tmp")
    # Owner-only, as the shm file: the handles reach the served weights.
    with open(tmp, "wb", opener=lambda p, flags: os.open(p, flags, 0o600)) as f:
        pickle.dump(handles, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    atexit.register(_unlink_quietly, str(path))
    entries = tuple(TensorEntry(name, dtype_name(p.dtype), tuple(p.shape)) for name, p in params)
    return Manifest(
        backend="cuda_ipc",
        payload=str(path),
        exporter=identity,
        model_path=model_path,
        dtype=entries[0].dtype if entries else "",
        tensors=entries,
        views=build_views({e.name: e.shape for e in entries}, hf_config),
        hf_config=dict(hf_config),
        vllm_version=vllm_version,
        gpu_uuid=gpu_uuid(params[0][1].device) if params else "",
    )


def _view(buffer: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    dtype = dtype_from_name(entry.dtype)
    nbytes = entry.numel * dtype.itemsize
    return buffer[entry.offset : entry.offset + nbytes].view(dtype).view(entry.shape)


def _local_cuda_index(uuid_text: str) -> int | None:
    """Which local CUDA device has this UUID (the trainer may see every GPU of the node)."""
    for index in range(torch.cuda.device_count()):
        if gpu_uuid(torch.device("cuda", index)) == uuid_text:
            return index
    return None


def map_tensors(manifest: Manifest) -> dict[str, torch.Tensor]:
    """Map every exported tensor into this process, zero-copy, under vLLM's names."""
    if manifest.backend == "shm":
        if not os.path.exists(manifest.payload):
            raise ManifestError(f"shared weights file {manifest.payload} is gone (exporter exited?)")
        size = os.path.getsize(manifest.payload)
        buffer = torch.from_file(manifest.payload, shared=True, size=size, dtype=torch.uint8)
        return {e.name: _view(buffer, e) for e in manifest.tensors}
    with open(manifest.payload, "rb") as f:
        handles = pickle.load(f)  # written by our own exporter in the same pod; see module docstring
    device = _local_cuda_index(manifest.gpu_uuid) if manifest.gpu_uuid else None
    tensors = {}
    for name, (rebuild, args) in handles.items():
        if device is not None:
            # reduce_tensor records the exporter's device index; the trainer may number GPUs differently.
            args = (*args[:6], device, *args[7:])
        tensors[name] = rebuild(*args)
    return tensors


def hf_views(manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face parameter name -> a view (row slice) of an exported tensor. Never a copy."""
    views = {}
    for view in manifest.views:
        base = tensors[view.source]
        views[view.name] = base if view.rows is None else base[view.rows[0] : view.rows[1]]
    return views


def wait_for_manifest(run_dir: str | os.PathLike[str], timeout_s: float) -> Manifest:
    """Block until an exporter writes a manifest (tests and CLIs; the worker polls instead)."""
    from hogwild.handles import read_manifest

    deadline = time.monotonic() + timeout_s
    while True:
        manifest = read_manifest(run_dir)
        if manifest is not None:
            return manifest
        if time.monotonic() > deadline:
            raise TimeoutError(f"no weights manifest in {run_dir} after {timeout_s:.0f} s")
        time.sleep(0.2)
