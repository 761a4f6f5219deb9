"""Everything that depends on a particular vLLM release lives here, tested against the pinned one (0.32).

The one patch of vLLM internals: on CPU, vLLM packs linear weights into private oneDNN/SGL handles and
empties `layer.weight` (`dispatch_cpu_unquantized_gemm(..., remove_weight=True)`), so writes from another
process would never reach generation. We make CPU linears call plain `F.linear` on the parameter itself.
It costs ~20-30 % of CPU generation speed (FACTS.md), and it is what makes in-place training visible.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("hogwild.vllm")

SUPPORTED_VLLM = ("0.32.",)
# `python -m` target of vLLM's OpenAI server (vllm.entrypoints.openai.api_server is deprecated in 0.32).
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
_PATCHED_ATTR = "_hogwild_plain_linear"


def vllm_version() -> str:
    try:
        from vllm import __version__
    except ImportError:
        return ""
    return str(__version__)


def version_supported(version: str) -> bool:
    return version.startswith(SUPPORTED_VLLM)


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
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    return dict(vars(parser.parse_args(["--model", model_dir, *extra])))
