"""vLLM settings that silently break in-place weight sharing, refused at launch with a reason.

Pure: takes the parsed vLLM arguments (as a mapping) and the environment, returns the problems found.
Each reason says what to change. Sources: docs/facts.md "vLLM's GPU path" (read from the vLLM 0.32 source).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


def _compilation_freezes(compilation: Any) -> bool:
    if isinstance(compilation, Mapping):
        inductor = compilation.get("inductor_compile_config") or {}
        return bool(inductor.get("freezing")) or bool(compilation.get("max_autotune"))
    inductor = getattr(compilation, "inductor_compile_config", None) or {}
    return bool(inductor.get("freezing"))


def unsafe_settings(args: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """Every reason why these settings would break in-place training; empty when they are safe."""
    problems = []
    if args.get("enable_sleep_mode"):
        problems.append(
            "--enable-sleep-mode uses the cumem allocator, whose memory cannot be shared with classic CUDA "
            "IPC handles; remove it"
        )
    if "expandable_segments:true" in env.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower():
        problems.append(
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True moves weights into memory that CUDA IPC "
            "cannot export; unset it"
        )
    if float(args.get("cpu_offload_gb") or 0) > 0:
        problems.append("--cpu-offload-gb copies weights between host and GPU on every step; set it to 0")
    if args.get("enable_lora"):
        problems.append("--enable-lora renames and wraps the linear layers the trainer maps; remove it")
    if args.get("speculative_config"):
        problems.append("speculative decoding keeps a draft model the trainer does not update; remove it")
    if _truthy(env.get("TORCHINDUCTOR_FREEZING", "")) or _compilation_freezes(args.get("compilation_config")):
        problems.append(
            "inductor freezing bakes the weights into compiled code as constants, so updates are never "
            "seen; unset TORCHINDUCTOR_FREEZING and remove freezing/max_autotune from --compilation-config"
        )
    backend = args.get("linear_backend")
    if backend not in (None, "", "auto"):
        problems.append(f"--linear-backend {backend} may re-lay out the weights; use the default (auto)")
    if int(args.get("tensor_parallel_size") or 1) != 1 or int(args.get("pipeline_parallel_size") or 1) != 1:
        problems.append("v1alpha1 trains one GPU per session: tensor and pipeline parallel size must be 1")
    if args.get("quantization"):
        problems.append(f"quantization {args['quantization']!r} stores weights the trainer cannot update")
    return problems
