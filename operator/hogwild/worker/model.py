"""Build the Hugging Face module over vLLM's own weight memory: every parameter a view, nothing copied.

The module is constructed on the `meta` device (no memory), then `load_state_dict(views, assign=True)` makes
each parameter BE the mapped view (a row slice of vLLM's fused tensor), so an optimizer step on the module
writes straight into what vLLM serves. What `meta` cannot carry is rebuilt on the real device: the
non-persistent buffers such as rotary `inv_freq` (docs/facts.md "Weights on GPU"). Tied embeddings: vLLM exports
no `lm_head`; HF's own tying makes `lm_head.weight` the embedding view.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hogwild import sharing
from hogwild.handles import Manifest, ManifestError
from hogwild.typed_calls import causal_lm_from_config

# The families whose modeling code `prewarm_imports` loads ahead of the first manifest.
PREWARM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Held while transformers is imported: its lazy top-level module answered "cannot import name 'AutoConfig'"
# to a mapping that ran while the prewarm thread was still importing it (transformers 5.19), and the
# mapping then waited out its 10 s retry. A mapping takes it too, so it waits for the prewarm instead.
_TRANSFORMERS_IMPORT = threading.Lock()


def prewarm_imports() -> list[str]:
    """Import transformers and the modeling modules of the common families; returns the ones imported.

    Why: the first `AutoModelForCausalLM.from_config` imports them, which took 7-13 s on the GPU machine
    (bench/NOTES-gpu.md), all of it between vLLM exporting its weights and the worker being able to train.
    The worker calls this on a thread at start-up, while vLLM is still loading; a mapping that comes first
    waits for it (one lock) instead of racing it.
    """
    import importlib

    loaded = []
    with _TRANSFORMERS_IMPORT:  # a mapping waits for this (see _TRANSFORMERS_IMPORT)
        importlib.import_module("transformers")
        for family in PREWARM_FAMILIES:
            name = f"transformers.models.{family}.modeling_{family}"
            try:
                importlib.import_module(name)
            except ImportError:  # an older transformers without the family: mapping such a model fails anyway
                continue
            loaded.append(name)
    return loaded


class MappingError(RuntimeError):
    """The exported tensors do not fit the model the manifest describes; the message says which."""


@dataclass
class MappedModel:
    """The mapped weights and the module built over them. Keep it alive as long as the module is used."""

    manifest: Manifest
    module: Any  # transformers.PreTrainedModel
    exported: dict[str, torch.Tensor]  # vLLM name -> the mapped tensor
    views: dict[str, torch.Tensor]  # HF name -> view of an exported tensor
    device: torch.device
    tied: bool

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.exported.values())

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint saves, under HF names: every view (a tied model has no separate lm_head)."""
        return {name: t for name, t in self.views.items() if not (self.tied and name == "lm_head.weight")}


def load_hf_config(manifest: Manifest) -> Any:
    """The served model's HF config: its config.json when the model path is a directory, else the manifest's."""
    from transformers import AutoConfig

    if (Path(manifest.model_path) / "config.json").is_file():
        return AutoConfig.from_pretrained(manifest.model_path)
    values = dict(manifest.hf_config)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise MappingError("the manifest has no model_type and the model path is not a directory")
    return AutoConfig.for_model(model_type, **values)


def build_module(hf_config: Any, views: Mapping[str, torch.Tensor], device: torch.device) -> Any:
    """An HF causal LM whose parameters are exactly `views` (same storage), in train mode."""
    with torch.device("meta"):
        module = causal_lm_from_config(hf_config)
    expected = set(module.state_dict())
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    missing = expected - set(views) - ({"lm_head.weight"} if tied else set())
    unexpected = set(views) - expected
    if missing or unexpected:
        raise MappingError(
            f"exported weights do not match {type(module).__name__}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    module.load_state_dict(dict(views), assign=True, strict=False)
    if tied:
        module.tie_weights()  # lm_head.weight becomes the embedding view itself
    _rebuild_meta_buffers(module, device)
    module.config.use_cache = False
    module.train()
    _check_aliasing(module, views)
    return module


def _rebuild_meta_buffers(module: torch.nn.Module, device: torch.device) -> None:
    """Re-create submodules whose (non-persistent) buffers stayed on `meta`, e.g. rotary embeddings."""
    for name, sub in list(module.named_modules()):
        if not any(b.is_meta for b in sub.buffers(recurse=False)):
            continue
        config = getattr(sub, "config", None)
        if config is None:
            raise MappingError(f"cannot rebuild the buffers of {name} ({type(sub).__name__}) on {device}")
        with torch.device(device):
            fresh = type(sub)(config=config)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, fresh)
    left = [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise MappingError(f"buffers still on the meta device: {left[:5]}")


def _check_aliasing(module: torch.nn.Module, views: Mapping[str, torch.Tensor]) -> None:
    """Fail loudly if any parameter is not the exported memory (a silent copy would train nothing served)."""
    for name, param in module.named_parameters(remove_duplicate=False):
        view = views.get(name)
        if view is not None and (param.data_ptr() != view.data_ptr() or param.shape != view.shape):
            raise MappingError(f"{name} is not an alias of the exported tensor")


def resolve_device(
    manifest: Manifest, exported: Mapping[str, torch.Tensor], requested: str | None
) -> torch.device:
    device = next(iter(exported.values())).device if exported else torch.device("cpu")
    if requested and requested != "auto" and torch.device(requested).type != device.type:
        raise MappingError(
            f"--device {requested} but the exporter's weights are on {device} ({manifest.backend})"
        )
    return device


def map_model(manifest: Manifest, requested_device: str | None = None) -> MappedModel:
    """Map the exporter's tensors and build the module over them. Raises ManifestError / MappingError."""
    if not manifest.tensors:
        raise ManifestError("the manifest lists no tensors")
    exported = sharing.map_tensors(manifest)
    device = resolve_device(manifest, exported, requested_device)
    views = sharing.hf_views(manifest, exported)
    with _TRANSFORMERS_IMPORT:
        hf_config = load_hf_config(manifest)
        module = build_module(hf_config, views, device)
    tied = "lm_head.weight" not in views
    return MappedModel(manifest, module, exported, views, device, tied)


def load_tokenizer(model_path: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)
