"""The checkpoint layout (docs/design.md "Contracts"), and writing, finding, pruning and restoring checkpoints.

    <checkpoint dir>/step-<8 digits>/
        model.safetensors              (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
        config.json, generation_config.json, tokenizer files     copied from the served model dir
        optimizer.pt                   optimizer state_dict + trainer counters (torch.load(weights_only=True))
        meta.json                      written LAST: a directory without it is incomplete and ignored

Weights are saved under Hugging Face names, so the directory is a model directory that vLLM and transformers
load as is; `hogwild vllm` starts from `newest_complete(dir)` after a restart. A checkpoint is built under a
temporary name, every file fsynced, then renamed into place: a crash at any moment leaves the previous
checkpoints whole. "Newest" is by meta.json's time (then step), so that after a restore of an older step
and training on, the checkpoint written next is the one picked, even though its step number is lower.

Listing and choosing are pure over what `read_meta` returns; writing and restoring do the I/O.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hogwild.faults import fault_point
from hogwild.replies import CheckpointSummary

if TYPE_CHECKING:
    import torch

FORMAT = "hogwild-checkpoint"
VERSION = 1
META_NAME = "meta.json"
OPTIMIZER_NAME = "optimizer.pt"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")
TEMP_PREFIXES = (".tmp-", ".old-")
# Files of the served model directory that make the checkpoint a loadable model directory of its own.
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
DEFAULT_SHARD_BYTES = 4 << 30


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model; the message says which."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    time: float
    meta: Mapping[str, Any]

    def summary(self) -> CheckpointSummary:
        return {"step": self.step, "path": str(self.path), "time": self.time}


def checkpoint_name(step: int) -> str:
    if not 0 <= step < 10**8:
        raise ValueError(f"step {step} does not fit the 8-digit layout")
    return f"step-{step:08d}"


def read_meta(path: Path) -> dict[str, Any] | None:
    """meta.json of a checkpoint dir, or None when the checkpoint is incomplete or not ours."""
    try:
        meta = json.loads((path / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("step"), int):
        return None
    return meta


def list_complete(root: str | os.PathLike[str]) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (by meta time, then step)."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(root):
            match = STEP_DIR.match(entry.name)
            if not match or not entry.is_dir():
                continue
            meta = read_meta(Path(entry.path))
            if meta is not None and meta["step"] == int(match[1]):
                found.append(Checkpoint(Path(entry.path), meta["step"], float(meta.get("time", 0.0)), meta))
    return sorted(found, key=lambda c: (c.time, c.step))


def newest_complete(root: str | os.PathLike[str]) -> Checkpoint | None:
    """The checkpoint to resume from: the newest complete one, or None."""
    complete = list_complete(root)
    return complete[-1] if complete else None


def find(root: str | os.PathLike[str], step: int | None) -> Checkpoint | None:
    """The checkpoint of `step`, or the newest when `step` is None."""
    if step is None:
        return newest_complete(root)
    return next((c for c in list_complete(root) if c.step == step), None)


def prune_plan(checkpoints: Sequence[Checkpoint], keep: int) -> list[Checkpoint]:
    """Which checkpoints to delete to keep the newest `keep` (input oldest first). Pure."""
    return list(checkpoints[: max(0, len(checkpoints) - max(1, keep))])


def shard_plan(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most `max_shard_bytes` (a bigger tensor gets one alone). Pure."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


# ---- writing ------------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owner_only(path: str | os.PathLike[str], flags: int) -> int:
    """`open` opener: files of a checkpoint are created readable by their owner alone (0600)."""
    return os.open(path, flags, 0o600)


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w", opener=_owner_only) as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_weights(out: Path, weights: Mapping[str, torch.Tensor], max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    sizes = {name: t.numel() * t.element_size() for name, t in weights.items()}
    shards = shard_plan(sizes, max_shard_bytes)
    names = shard_file_names(len(shards))
    for file_name, shard in zip(names, shards, strict=True):
        # Contiguous CPU copies, one shard at a time (bounded host memory): the views share storage (q/k/v
        # of one qkv_proj), which safetensors refuses to save as is.
        tensors = {name: weights[name].detach().to("cpu", copy=True).contiguous() for name in shard}
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        _fsync_path(out / file_name)
        del tensors
    if len(shards) > 1:
        weight_map = {
            name: file_name for file_name, shard in zip(names, shards, strict=True) for name in shard
        }
        _write_json(
            out / INDEX_NAME, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        )


def copy_model_files(model_dir: str, out: Path, hf_config: Any = None, tokenizer: Any = None) -> None:
    """config, generation config and tokenizer of the served model (saved from objects when not a dir)."""
    source = Path(model_dir)
    for name in MODEL_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if not (out / "config.json").exists() and hf_config is not None:
        hf_config.to_json_file(str(out / "config.json"))
    if not (out / "tokenizer_config.json").exists() and tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    for path in out.iterdir():
        if path.is_file():
            _fsync_path(path)


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished temp dir into place; a same-step checkpoint is replaced, never left half."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class Written:
    checkpoint: Checkpoint
    bytes: int
    seconds: float


def write(
    root: str | os.PathLike[str],
    *,
    step: int,
    weights: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any],
    model_dir: str,
    meta: Mapping[str, Any],
    hf_config: Any = None,
    tokenizer: Any = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Written:
    """Write one checkpoint atomically. The caller keeps the weights still (holds the trainer lock)."""
    started = time.monotonic()
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = root_path / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    import torch  # here, not at the top: choosing a checkpoint (`hogwild vllm`) must not pay for torch

    write_weights(tmp, weights, max_shard_bytes)
    fault_point("checkpoint.after_weights")
    torch.save(dict(optimizer_state), tmp / OPTIMIZER_NAME)
    _fsync_path(tmp / OPTIMIZER_NAME)
    fault_point("checkpoint.after_optimizer")
    copy_model_files(model_dir, tmp, hf_config, tokenizer)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    full_meta = {
        **meta,
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "time": time.time(),
        "files": files,
        "bytes": sum(files.values()),
    }
    for path in tmp.iterdir():  # weights, optimizer state and model files alike: the owner's only
        path.chmod(0o600)
    _write_json(tmp / META_NAME, full_meta)  # last: its presence is what makes the checkpoint complete
    _fsync_path(tmp)
    fault_point("checkpoint.before_rename")
    _install(tmp, root_path / name)
    checkpoint = Checkpoint(root_path / name, step, full_meta["time"], full_meta)
    return Written(
        checkpoint,
        full_meta["bytes"] + os.path.getsize(checkpoint.path / META_NAME),
        time.monotonic() - started,
    )


def prune(root: str | os.PathLike[str], keep: int) -> list[Path]:
    removed = []
    for checkpoint in prune_plan(list_complete(root), keep):
        # Rename first: a crash mid-delete must not leave a directory that still looks complete.
        doomed = checkpoint.path.with_name(f".old-{checkpoint.path.name}-{os.getpid()}")
        os.rename(checkpoint.path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(checkpoint.path)
    return removed


def sweep_temporary(root: str | os.PathLike[str]) -> list[Path]:
    """Remove what crashed writes left behind (only one worker writes to a checkpoint dir)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(root):
            if entry.name.startswith(TEMP_PREFIXES) and entry.is_dir():
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
    return removed


# ---- restoring ----------------------------------------------------------------------------------------
def weight_files(checkpoint: Checkpoint) -> list[Path]:
    index = checkpoint.path / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [checkpoint.path / name for name in sorted(set(weight_map.values()))]
    return [checkpoint.path / WEIGHTS_NAME]


def load_weights_into(checkpoint: Checkpoint, targets: Mapping[str, torch.Tensor]) -> int:
    """Copy the checkpoint's weights INTO `targets` in place (never rebinding). Returns bytes copied.

    Every name and shape is checked before the first byte is written, so a mismatch changes nothing.
    """
    from safetensors import safe_open

    files = weight_files(checkpoint)
    located: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = tuple(f.get_slice(name).get_shape())
                target = targets.get(name)
                if target is not None and tuple(target.shape) != shape:
                    raise CheckpointError(
                        f"{name}: checkpoint shape {shape}, served shape {tuple(target.shape)}"
                    )
                located[name] = path
    missing = sorted(set(targets) - set(located))
    if missing:
        raise CheckpointError(f"{checkpoint.path} lacks {len(missing)} weights, e.g. {missing[:3]}")
    import torch

    copied = 0
    with torch.no_grad():
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118
                    if name in targets:
                        targets[name].copy_(f.get_tensor(name))
                        copied += targets[name].numel() * targets[name].element_size()
    return copied


def load_optimizer_state(checkpoint: Checkpoint) -> dict[str, Any]:
    import torch

    path = checkpoint.path / OPTIMIZER_NAME
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
