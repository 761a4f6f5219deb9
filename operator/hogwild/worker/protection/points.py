"""Where the preemption points go: before the forward and the backward of the input embedding, every decoder
layer, every projection inside it and the output head, so that training work comes in chunks of about a
millisecond; large projections also run in pieces (`preemptible_linear`). The point itself is the gate's
(`gate.ServingGate.point`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hogwild.typed_calls import on_gradient
from hogwild.worker.protection import preemptible_linear


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of an HF causal LM (`model.layers`), else the longest ModuleList."""
    inner = getattr(module, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return list(layers)
    lists = [list(m) for m in module.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else []


def _first_grad_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_grad_tensor(item)
            if found is not None:
                return found
    return None


GRANULARITIES = ("layer", "linear")


def preemption_blocks(
    module: torch.nn.Module, granularity: str = "linear", embeddings: bool = True
) -> list[torch.nn.Module]:
    """Where the points go: the input embedding, each decoder layer (and, with "linear", each linear layer
    inside it), then the head.

    The embedding matters in backward: its gradient is a dense [vocab, hidden] tensor whatever the batch
    size (~2 ms at 1.5B), work that otherwise runs unannounced at the end of every micro-batch.

    A chunk of training work is what runs between two points: one decoder layer of one micro-batch, or one
    projection of it (at 7B and 4k tokens, ~2.6 ms forward for a layer, ~0.8 ms for one MLP projection).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    blocks: list[torch.nn.Module] = []
    get_embeddings = getattr(module, "get_input_embeddings", None)
    embedding = get_embeddings() if callable(get_embeddings) else None
    if embeddings and isinstance(embedding, torch.nn.Module):
        blocks.append(embedding)
    for layer in decoder_layers(module):
        blocks.append(layer)
        if granularity == "linear":
            blocks.extend(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
    head = getattr(module, "lm_head", None)
    if isinstance(head, torch.nn.Module):
        blocks.append(head)
    return blocks


def install_preemption_points(
    module: torch.nn.Module,
    point: Callable[[], None],
    granularity: str = "linear",
    embeddings: bool = True,
    split_matmuls: bool = True,
    split_while: Callable[[], bool] = lambda: True,
) -> Callable[[], None]:
    """Call `point` before each block's forward and before its backward (see `preemption_blocks`); with
    "linear" granularity and `split_matmuls`, a projection's matmuls above `preemptible_linear.PIECE_FLOPS`
    also run in pieces with a point before each (7B's MLP projections; none at 1.5B), on the calls made while
    `split_while()` (the worker passes "serving protection is on").

    Returns a function that removes them again.
    """

    def before_forward(_module: torch.nn.Module, _args: Any) -> None:
        point()

    def after_forward(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        tensor = _first_grad_tensor(output)
        if tensor is not None and torch.is_grad_enabled():
            # Runs when the gradient of this block's output is ready: just before the block's backward.
            on_gradient(tensor, _backward_point(point))

    handles: list[Any] = []
    blocks = preemption_blocks(module, granularity, embeddings)
    for block in blocks:
        handles.append(block.register_forward_pre_hook(before_forward))
        handles.append(block.register_forward_hook(after_forward))
    # The head too: a 512-row chunk of it (pieces.chunked_head_backward) is ~0.8 ms a matmul at 7B.
    linears = [b for b in blocks if isinstance(b, torch.nn.Linear)]
    splits = split_matmuls and granularity == "linear"
    unsplit = preemptible_linear.install(linears, point, split_while) if splits else None

    def remove() -> None:
        for handle in handles:
            handle.remove()
        if unsplit is not None:
            unsplit()

    return remove


def _backward_point(point: Callable[[], None]) -> Callable[[torch.Tensor], None]:
    def hook(_grad: torch.Tensor) -> None:
        point()

    return hook
