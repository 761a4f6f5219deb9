"""Typed faces of the few torch and transformers calls that their libraries ship without annotations.

Why: mypy --strict refuses a call to an unannotated function from annotated code, and would give its result
the type `Any`, which then spreads unchecked. Each face says what the call takes and gives for the versions
pyproject.toml pins, so that callers stay checked; the casts here are the only places that trust those
libraries' unannotated code. A face that needs more than a cast (or a library that adds annotations) makes
it obsolete: call the library directly then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


def cuda_initialized() -> bool:
    """`torch.cuda.is_initialized()`: whether this process created its CUDA context yet."""
    is_initialized = cast(Callable[[], bool], torch.cuda.is_initialized)
    return is_initialized()


def cuda_timing_event() -> torch.cuda.Event:
    """`torch.cuda.Event(enable_timing=True)`: an event whose time `elapsed_time` can read."""
    event = cast(Callable[..., torch.cuda.Event], torch.cuda.Event)
    return event(enable_timing=True)


def on_gradient(tensor: torch.Tensor, hook: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """`tensor.register_hook(hook)`: call `hook(grad)` when the gradient of `tensor` is computed."""
    register = cast(Callable[[Callable[[torch.Tensor], None]], RemovableHandle], tensor.register_hook)
    return register(hook)


def apply_autograd(function: type[torch.autograd.Function], *args: object) -> torch.Tensor:
    """`function.apply(*args)` for an autograd Function whose forward returns one tensor."""
    apply = cast(Callable[..., torch.Tensor], function.apply)
    return apply(*args)


def cuda_ipc_handle(tensor: torch.Tensor) -> tuple[Callable[..., torch.Tensor], tuple[Any, ...]]:
    """torch.multiprocessing's picklable handle of a CUDA tensor's storage: (rebuild, its arguments); another
    process calls `rebuild(*arguments)` for a tensor on the same memory."""
    from torch.multiprocessing.reductions import reduce_tensor

    reduce = cast(
        Callable[[torch.Tensor], tuple[Callable[..., torch.Tensor], tuple[Any, ...]]], reduce_tensor
    )
    return reduce(tensor)


def causal_lm_from_config(config: PretrainedConfig, **options: Any) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_config(config, **options)`: the model class the config names, initialized
    (on the current default device, `meta` included)."""
    from transformers import AutoModelForCausalLM

    from_config = cast(Callable[..., "PreTrainedModel"], AutoModelForCausalLM.from_config)
    return from_config(config, **options)
