"""The weight-handle manifest: how the trainer finds vLLM's weights (docs/design.md "Contracts").

The exporter (the vLLM plugin, or hogwild.testing.exporter) writes `<run dir>/weights.json` plus a payload:

- backend "shm" (CPU): one file in /dev/shm holding every tensor at a 64-byte aligned offset; vLLM's
  parameters are rebound as views of it, so the file IS vLLM's weight memory.
- backend "cuda_ipc" (GPU): a pickle of `torch.multiprocessing.reductions.reduce_tensor` results of vLLM's
  own parameter storage; nothing is moved.

The manifest also carries everything the importer needs with no other channel: the model path, dtype, vLLM
version, GPU UUID, the exporter identity (pid, process start time and a nonce: a change means vLLM
restarted and the weights must be re-mapped), and the fused-layout map `views`: for each Hugging Face
parameter name, which exported tensor it is a row-slice of (vLLM fuses q/k/v into qkv_proj and gate/up into
gate_up_proj, and pads embeddings to a multiple of 64 rows).

This module is pure (manifest encode/decode and the view map); tensor sharing lives in hogwild.sharing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FORMAT = "hogwild-weights"
MANIFEST_VERSION = 1
BACKENDS = ("shm", "cuda_ipc")
ALIGN_BYTES = 64


class ManifestError(ValueError):
    """The manifest is missing, malformed, or from an incompatible exporter."""


@dataclass(frozen=True)
class TensorEntry:
    """One exported tensor, under vLLM's parameter name. `offset` is the byte offset in an shm payload."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ViewEntry:
    """A Hugging Face parameter as rows [start, stop) of an exported tensor (all rows when `rows` is None)."""

    name: str
    source: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class ExporterIdentity:
    pid: int
    start_time: float
    nonce: str
    hostname: str = ""


@dataclass(frozen=True)
class Manifest:
    backend: str
    payload: str
    exporter: ExporterIdentity
    model_path: str
    dtype: str
    tensors: tuple[TensorEntry, ...]
    views: tuple[ViewEntry, ...]
    hf_config: Mapping[str, Any] = field(default_factory=dict)
    vllm_version: str = ""
    gpu_uuid: str = ""
    payload_bytes: int = 0

    def tensor(self, name: str) -> TensorEntry:
        for entry in self.tensors:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def to_json(self) -> str:
        data = asdict(self)
        data = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **data}
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ManifestError(f"weights manifest is not JSON: {err}") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ManifestError("not a hogwild weights manifest")
        if data.get("version") != MANIFEST_VERSION:
            raise ManifestError(
                f"manifest version {data.get('version')!r}, this side reads {MANIFEST_VERSION}"
            )
        if data.get("backend") not in BACKENDS:
            raise ManifestError(f"unknown weight-sharing backend {data.get('backend')!r}")
        try:
            return cls(
                backend=data["backend"],
                payload=data["payload"],
                exporter=ExporterIdentity(**data["exporter"]),
                model_path=data["model_path"],
                dtype=data["dtype"],
                tensors=tuple(
                    TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t.get("offset", 0))
                    for t in data["tensors"]
                ),
                views=tuple(
                    ViewEntry(v["name"], v["source"], tuple(v["rows"]) if v.get("rows") else None)
                    for v in data["views"]
                ),
                hf_config=data.get("hf_config", {}),
                vllm_version=data.get("vllm_version", ""),
                gpu_uuid=data.get("gpu_uuid", ""),
                payload_bytes=data.get("payload_bytes", 0),
            )
        except (KeyError, TypeError) as err:
            raise ManifestError(f"weights manifest is missing or has a malformed field: {err}") from None


def manifest_path(run_dir: str | os.PathLike[str]) -> Path:
    from hogwild.defaults import MANIFEST_NAME

    return Path(run_dir) / MANIFEST_NAME


def write_manifest(run_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Atomically (temp name, fsync, rename): a reader never sees half a manifest."""
    path = manifest_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(run_dir: str | os.PathLike[str]) -> Manifest | None:
    """The current manifest, or None when no exporter has written one yet."""
    try:
        text = manifest_path(run_dir).read_text()
    except FileNotFoundError:
        return None
    return Manifest.from_json(text)


def align(offset: int, to: int = ALIGN_BYTES) -> int:
    return (offset + to - 1) // to * to


# ---- the fused-layout map -----------------------------------------------------------------------------
_LAYER_PARAM = re.compile(r"^(?P<prefix>.*\.)(?P<fused>qkv_proj|gate_up_proj)\.(?P<kind>weight|bias)$")
_VOCAB_PARAMS = ("model.embed_tokens.weight", "lm_head.weight")


def fused_row_splits(hf_config: Mapping[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """How many rows each HF projection takes inside vLLM's fused tensors, in order."""
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(hf_config.get("num_key_value_heads") or heads)
    head_dim = int(hf_config.get("head_dim") or int(hf_config["hidden_size"]) // heads)
    intermediate = int(hf_config["intermediate_size"])
    return {
        "qkv_proj": [
            ("q_proj", heads * head_dim),
            ("k_proj", kv_heads * head_dim),
            ("v_proj", kv_heads * head_dim),
        ],
        "gate_up_proj": [("gate_proj", intermediate), ("up_proj", intermediate)],
    }


def build_views(shapes: Mapping[str, tuple[int, ...]], hf_config: Mapping[str, Any]) -> tuple[ViewEntry, ...]:
    """Map vLLM parameter names/shapes onto Hugging Face names as row slices.

    Raises ManifestError when a fused tensor's rows do not add up: a layout this version does not know.
    """
    splits = fused_row_splits(hf_config)
    vocab = int(hf_config["vocab_size"])
    views: list[ViewEntry] = []
    for name, shape in shapes.items():
        match = _LAYER_PARAM.match(name)
        if match:
            parts = splits[match["fused"]]
            if sum(rows for _, rows in parts) != shape[0]:
                raise ManifestError(f"{name} has {shape[0]} rows; expected {parts} from the model config")
            start = 0
            for hf_proj, rows in parts:
                hf_name = f"{match['prefix']}{hf_proj}.{match['kind']}"
                views.append(ViewEntry(hf_name, name, (start, start + rows)))
                start += rows
        elif name in _VOCAB_PARAMS:
            if shape[0] < vocab:
                raise ManifestError(f"{name} has {shape[0]} rows, fewer than vocab_size {vocab}")
            # vLLM pads the vocabulary dimension to a multiple of 64 with zero rows: view only the real ones.
            views.append(ViewEntry(name, name, (0, vocab)))
        else:
            views.append(ViewEntry(name, name, None))
    return tuple(views)
