"""Linear layers whose large matmuls run in pieces, with a preemption point before each piece.

Why: the gate's points sit before each projection's forward and before its backward (`protection`), so the
backward of a projection (input gradient, then weight gradient) is one piece of GPU work. At 7B and 4k tokens
an MLP projection's matmul is ~0.8 ms on an H100, so that piece is ~1.6 ms, and the slowest serving requests
under the default protection arrived behind such chunks and lost about twice the queued work to the GPU's
time-slicing between the two processes (bench --timeline, bench/RESULTS.md). Here a projection whose matmul
is larger than PIECE_FLOPS runs as row blocks of its output, each at most about PIECE_FLOPS: the forward and
the input gradient in blocks of tokens, the weight gradient in blocks of output features.

Same arithmetic: every output element is still one dot product over the same reduced dimension; only the
matmul shapes change (cuBLAS may choose another kernel per shape, so the last bit can differ). Projections at
or under PIECE_FLOPS (all of them at 1.5B and 4k tokens) take torch's own `F.linear`, untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from hogwild.typed_calls import apply_autograd

# Multiply-adds x 2 of one piece: ~0.3 ms at the ~700 TFLOP/s an H100 reaches on bf16 matmuls, so queued
# training work stays well under the ~2 ms the gate's ChunkQueue allows, in pieces of a few kernels each.
PIECE_FLOPS = 2e11
# Blocks start at multiples of this many rows. The weight gradient's blocks are column slices of the output
# gradient, so a block's first element sits `start` elements into each row: at an odd offset cuBLAS loses
# its aligned kernels (H100, 7B gate_proj: 3 blocks 3.11 ms against one matmul's 0.79; bench/gpu_pieces.py).
# 64 bf16 elements are 128 bytes.
ALIGN_ROWS = 64


def piece_count(rows: int, reduced: int, cols: int) -> int:
    """How many row blocks an (rows x reduced) @ (reduced x cols) matmul is cut into: 1 up to PIECE_FLOPS."""
    flops = 2.0 * rows * reduced * cols
    return max(1, min(rows, math.ceil(flops / PIECE_FLOPS)))


def row_blocks(rows: int, count: int, align: int | None = None) -> list[slice]:
    """`rows` in at most `count` contiguous blocks that start at multiples of `align` (default ALIGN_ROWS;
    the last block shorter)."""
    align = ALIGN_ROWS if align is None else align
    size = -(-max(rows, 1) // count)
    size = -(-size // align) * align
    return [slice(start, min(start + size, rows)) for start in range(0, max(rows, 1), size)]


def matmul_in_pieces(
    left: torch.Tensor,
    right: torch.Tensor,
    out: torch.Tensor,
    point: Callable[[], None],
    *,
    bias: torch.Tensor | None = None,
    point_first: bool = False,
) -> torch.Tensor:
    """`out = left @ right (+ bias)`, 2-D, in row blocks of `left` with `point` before each block after the
    first (and before the first too with `point_first`); returns `out`."""
    blocks = row_blocks(left.shape[0], piece_count(left.shape[0], left.shape[1], right.shape[1]))
    for index, rows in enumerate(blocks):
        if index or point_first:
            point()
        if bias is None:
            torch.mm(left[rows], right, out=out[rows])
        else:
            torch.addmm(bias, left[rows], right, out=out[rows])
    return out


class _PiecewiseLinear(torch.autograd.Function):
    """`F.linear` whose forward and backward matmuls are `matmul_in_pieces`."""

    @staticmethod
    def forward(
        ctx: Any,
        inputs: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        point: Callable[[], None],
    ) -> torch.Tensor:
        flat = inputs.reshape(-1, inputs.shape[-1])
        out = flat.new_empty((flat.shape[0], weight.shape[0]))
        matmul_in_pieces(flat, weight.t(), out, point, bias=bias)
        ctx.save_for_backward(inputs, weight)
        ctx.point = point
        return out.view(*inputs.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        inputs, weight = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        flat = inputs.reshape(-1, inputs.shape[-1])
        grad_inputs = grad_weight = grad_bias = None
        # The point before this backward ran already (the module's output hook); later pieces get their own.
        launched = False
        if ctx.needs_input_grad[0]:
            grad_inputs = matmul_in_pieces(grad, weight, torch.empty_like(flat), ctx.point).view(inputs.shape)
            launched = True
        if ctx.needs_input_grad[1]:
            grad_weight = matmul_in_pieces(
                grad.t(), flat, torch.empty_like(weight), ctx.point, point_first=launched
            )
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_inputs, grad_weight, grad_bias, None


def piecewise_forward(
    module: torch.nn.Linear, point: Callable[[], None], active: Callable[[], bool] = lambda: True
) -> Callable[[torch.Tensor], Any]:
    """A replacement for `module.forward`: `_PiecewiseLinear` when `active()` (serving protection is on: the
    pieces cost ~6 % of a 7B MLP's time, bench/gpu_pieces.py) and this call's matmul exceeds PIECE_FLOPS
    (decided per call: the token count varies), else torch's `F.linear`."""

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        tokens = inputs.numel() // max(1, inputs.shape[-1])
        if not active() or piece_count(tokens, module.in_features, module.out_features) == 1:
            return F.linear(inputs, module.weight, module.bias)
        return apply_autograd(_PiecewiseLinear, inputs, module.weight, module.bias, point)

    return forward


def install(
    modules: list[torch.nn.Linear], point: Callable[[], None], active: Callable[[], bool] = lambda: True
) -> Callable[[], None]:
    """Give each module the piecewise forward (an instance attribute over the class's); returns an undo."""
    for module in modules:
        module.forward = piecewise_forward(module, point, active)  # type: ignore[method-assign,assignment]

    def remove() -> None:
        for module in modules:
            if "forward" in vars(module):
                del module.forward

    return remove
