"""Channel norms of a bucket's gradients in one kernel launch, when they are separate allocations.

Why: a gradient outside a prepared buffer (`buckets.GradBuffer`) cannot be reduced as one stacked tensor, and
one `vector_norm` per gradient was most of the step's 119 norm launches at 1.5B (~2.4 ms of CUDA time against
a ~0.9 ms bytes floor). Here one program owns a tile of output channels of one gradient and loops over the
whole reduced dimension itself, so each norm is summed in one fixed order: no atomics, no split reduction,
and the result is the same bits from run to run.

The gradients are reached through a device table of their addresses (`rounding._device_table`), as the
fused update does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from hogwild.optim.rounding import _device_table, triton

if triton is not None:
    import triton.language as tl

# Programs per streaming multiprocessor that the grid aims for: a program of a small tile issues one load
# at a time, so memory latency is hidden by having several resident per SM.
_PROGRAMS_PER_SM = 8
# The reduced tile is fixed per orientation (it sets the summation order), the kept one is chosen to fill
# the grid. Row norms read rows contiguously: 256 columns a load. Column norms read `_KEEP` columns of
# `_COLUMN_REDUCE` rows; 16 columns (32 bytes, one memory sector) is the narrowest that wastes no bytes.
_ROW_REDUCE = 256
_COLUMN_REDUCE = 32
_ROW_KEEP = (16, 8, 4, 2)
_COLUMN_KEEP = (256, 128, 64, 32, 16)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter on CPU: an H100's count, so that tests pick the tiles a GPU would
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def channel_norms_(out: Tensor, grads: Sequence[Tensor], dim: int) -> Tensor:
    """`out[i] = ||grads[i]||_2` along `dim` of the 2-D gradient (kept as size 1), in fp32; returns `out`.

    `out` is (k, 1, n) for `dim` 0 (column norms) or (k, m, 1) for `dim` 1 (row norms). One kernel for the
    list on CUDA with Triton for bf16 contiguous gradients of one shape; else one `vector_norm` per gradient.
    """
    if fusable_norms(out, grads):
        _fused_channel_norms_(out, grads, dim)
        return out
    for own, grad in zip(out, grads, strict=True):
        torch.linalg.vector_norm(grad, dim=dim, keepdim=True, dtype=torch.float32, out=own)
    return out


def fusable_norms(out: Tensor, grads: Sequence[Tensor]) -> bool:
    """Whether `_fused_channel_norms_` takes these: CUDA, Triton, bf16, contiguous, one shape, non-empty."""
    if triton is None or not grads or not out.is_cuda or out.dtype != torch.float32:
        return False
    first = grads[0]
    if first.dim() != 2 or first.numel() == 0 or not out.is_contiguous() or out.shape[0] != len(grads):
        return False
    return all(
        g.dtype == torch.bfloat16 and g.is_contiguous() and g.shape == first.shape and g.device == out.device
        for g in grads
    )


def norm_tiles(rows: int, cols: int, k: int, dim: int, device: torch.device) -> tuple[int, int, int]:
    """(kept tile, reduced tile, warps) for `k` gradients of (rows, cols) reduced along `dim`.

    The kept tile is the widest whose grid has `_PROGRAMS_PER_SM` programs per SM (else the narrowest): at
    1.5B, 14 x [8960, 1536] row norms get 16 rows a program (7840 programs), 14 x [1536, 8960] column norms 64
    columns (1960), a single [8960, 1536] 8 rows (1120), the [151936, 1536] embedding 16 rows (9496).
    """
    kept, choices, reduce = (
        (rows, _ROW_KEEP, _ROW_REDUCE) if dim == 1 else (cols, _COLUMN_KEEP, _COLUMN_REDUCE)
    )
    target = _PROGRAMS_PER_SM * _sm_count(device)
    tile = next((t for t in choices if -(-kept // t) * k >= target), choices[-1])
    warps = 8 if tile * reduce >= 8192 else 4  # at most 32 accumulator registers a thread
    return tile, reduce, warps


def _fused_channel_norms_(
    out: Tensor, grads: Sequence[Tensor], dim: int, *, keep: int | None = None, num_warps: int | None = None
) -> None:
    """One launch of `_norms_kernel` over the list: program (tile of kept channels, i) writes `out[i]`'s tile.

    `keep` and `num_warps` override `norm_tiles` (for the benchmark); the reduced tile is never overridden.
    """
    rows, cols = grads[0].shape
    tile, reduce, warps = norm_tiles(rows, cols, len(grads), dim, out.device)
    tile, warps = keep or tile, num_warps or warps
    table = _device_table(tuple(g.data_ptr() for g in grads), out.device)
    kept = rows if dim == 1 else cols
    grid = (triton.cdiv(kept, tile), len(grads))
    _norms_kernel[grid](
        table, out, rows, cols, ROW_NORMS=dim == 1, BLOCK_KEEP=tile, BLOCK_REDUCE=reduce, num_warps=warps
    )


if triton is not None:

    @triton.jit
    def _norms_kernel(  # type: ignore[no-untyped-def]
        table_ptr, out_ptr, rows, cols,
        ROW_NORMS: tl.constexpr, BLOCK_KEEP: tl.constexpr, BLOCK_REDUCE: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(1)
        g_ptr = tl.load(table_ptr + t).to(tl.pointer_type(tl.bfloat16))
        keep = tl.program_id(0) * BLOCK_KEEP + tl.arange(0, BLOCK_KEEP)
        # Squares are summed in a full fp32 tile, one lane per (kept, reduced mod BLOCK_REDUCE) pair, and the
        # lanes of a channel added once at the end: a chain of size / BLOCK_REDUCE additions per lane, not
        # size, and one cross-thread reduction per program instead of one per load.
        if ROW_NORMS:  # reduce along a row: contiguous loads of BLOCK_REDUCE columns
            keep_mask = keep < rows
            base = keep.to(tl.int64)[:, None] * cols
            acc = tl.zeros((BLOCK_KEEP, BLOCK_REDUCE), dtype=tl.float32)
            for start in range(0, cols, BLOCK_REDUCE):
                col = start + tl.arange(0, BLOCK_REDUCE)
                mask = keep_mask[:, None] & (col < cols)[None, :]
                g = tl.load(g_ptr + base + col[None, :], mask=mask, other=0.0).to(tl.float32)
                acc += g * g
            norms = tl.sqrt_rn(tl.sum(acc, axis=1))
            tl.store(out_ptr + t.to(tl.int64) * rows + keep, norms, mask=keep_mask)
        else:  # reduce down a column: each load is BLOCK_REDUCE row segments of BLOCK_KEEP columns
            keep_mask = keep < cols
            acc = tl.zeros((BLOCK_REDUCE, BLOCK_KEEP), dtype=tl.float32)
            for start in range(0, rows, BLOCK_REDUCE):
                row = start + tl.arange(0, BLOCK_REDUCE)
                mask = (row < rows)[:, None] & keep_mask[None, :]
                offs = row.to(tl.int64)[:, None] * cols + keep[None, :]
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                acc += g * g
            norms = tl.sqrt_rn(tl.sum(acc, axis=0))
            tl.store(out_ptr + t.to(tl.int64) * cols + keep, norms, mask=keep_mask)
