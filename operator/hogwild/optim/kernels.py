"""One-pass Triton kernels over a bucket's bf16 gradients: their channel norms, and the projection with them.

Why: a gradient outside a prepared buffer (`buckets.GradBuffer`) cannot be reduced as one stacked tensor, and
one `vector_norm` per gradient was most of the step's 119 norm launches at 1.5B (~2.4 ms of CUDA time against
a ~0.9 ms bytes floor). Here one program owns a tile of output channels of one gradient and loops over the
whole reduced dimension itself, so each norm is summed in one fixed order: no atomics, no split reduction,
and the result is the same bits from run to run.

The projection R = P G (or G P) reduces over the same dimension as the channel norms, so
`project_with_norms` takes both in one read of G: at 1.5B the norms (~2.4 ms) and the projections (~1.3 ms)
each read every gradient once, in a ~10 ms step that fused torch AdamW does in 10.7 ms.

The gradients are reached through a device table of their addresses (`rounding._device_table`), as the
fused update does, so a prepared buffer's views and separate allocations take the same kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from hogwild.optim.rounding import _device_table, ceil_div, next_power_of_2
from hogwild.optim.triton_jit import kernel

try:  # as in rounding.py: Triton ships with CUDA torch, and these kernels are only an acceleration
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

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
# The projection kernel's programs each hold a (kept x rank) fp32 accumulator and pipeline their loads
# (Triton's software pipelining of a `tl.dot` loop), so fewer are resident per SM than for the norms; and
# a narrow kept tile rereads P (from L2) rank / tile times per byte of G, so the grid aims lower.
_PROJECTION_PROGRAMS_PER_SM = 4
_PROJECTION_REDUCE = 64  # the reduced tile: fixed, it sets the summation order of the squares
_PROJECTION_KEEP = (128, 64, 32, 16)  # 16: the narrowest operand side `tl.dot` takes
_PROJECTION_ACCUMULATORS = 128 * 128  # most kept x padded-rank fp32 accumulators (64 a thread at 8 warps)
# Ranks the kernel takes: `tl.dot` needs operand sides of at least 16 (a rank that is not a power of two
# is padded to one with masked zeros), and above 256 the accumulator would force a tile rereading P from
# L2 16 times or more per byte of G. Other ranks take the bmm path.
PROJECTION_RANKS = range(16, 257)


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
    grid = (ceil_div(kept, tile), len(grads))
    _norms_kernel[grid](
        table, out, rows, cols, ROW_NORMS=dim == 1, BLOCK_KEEP=tile, BLOCK_REDUCE=reduce, num_warps=warps
    )


def fusable_projection(grads: Sequence[Tensor] | Tensor, rank: int) -> bool:
    """Whether `project_with_norms` takes these: CUDA, Triton, a rank in PROJECTION_RANKS, and bf16
    contiguous 2-D gradients of one shape and device, as a list or stacked (k, m, n)."""
    if triton is None or rank not in PROJECTION_RANKS or len(grads) == 0:
        return False
    if isinstance(grads, Tensor):
        return grads.dim() == 3 and grads.is_cuda and grads.dtype == torch.bfloat16 and grads.is_contiguous()
    first = grads[0]
    if first.dim() != 2 or not first.is_cuda:
        return False
    return all(
        g.dtype == torch.bfloat16
        and g.is_contiguous()
        and g.shape == first.shape
        and g.device == first.device
        for g in grads
    )


def projection_tiles(rows: int, cols: int, k: int, rank: int, device: torch.device) -> tuple[int, int, int]:
    """(kept tile, reduced tile, warps) of `project_with_norms` for `k` gradients of (rows, cols).

    The kept dimension is the larger side (the columns of a wide gradient, the rows of a tall one). Its tile
    is the widest whose grid has `_PROJECTION_PROGRAMS_PER_SM` programs per SM and whose accumulator fits
    (else the narrowest). At rank 64 on an H100 (132 SMs; programs in brackets):
      1.5B: 28 x [1536, 1536] and 28 x [256, 1536]: 64 (672); 14 x [8960, 1536] and 14 x [1536, 8960]:
      128 (980); a single [8960, 1536]: 16 (560); the [151936, 1536] embedding: 128 (1187).
      7B: 19 x [3584, 3584]: 128 (532); 28 x [512, 3584]: 128 (784); 3 x [18944, 3584] and
      3 x [3584, 18944]: 64 (888); the [152064, 3584] embedding: 128 (1188).
    """
    kept = cols if rows <= cols else rows
    padded_rank = next_power_of_2(rank) if triton is not None else rank
    fitting = [t for t in _PROJECTION_KEEP if t * padded_rank <= _PROJECTION_ACCUMULATORS] or [16]
    target = _PROJECTION_PROGRAMS_PER_SM * _sm_count(device)
    tile = next((t for t in fitting if -(-kept // t) * k >= target), fitting[-1])
    # 8 warps from 8192 fp32 accumulators (R's or the squares'): 32 a thread up to rank 128
    warps = 8 if tile * max(padded_rank, _PROJECTION_REDUCE) >= 8192 else 4
    return tile, _PROJECTION_REDUCE, warps


def project_with_norms(
    projection: Tensor,
    grads: Sequence[Tensor] | Tensor,
    *,
    keep: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(R, channel norms) of a bucket's bf16 gradients, in one pass over them; both fp32.

    Wide gradients (m <= n): `projection` is (k, rank, m), R[i] = P[i] G[i] is (rank, n) and the norms
    (k, 1, n) are those of G's columns. Tall ones: `projection` is (k, n, rank), R[i] = G[i] P[i] is
    (m, rank) and the norms (k, m, 1) are those of G's rows. `grads` is a list or a stacked (k, m, n)
    tensor (see `fusable_projection`); `projection` is bf16 and contiguous. R is the fp32 accumulator
    itself, not rounded to bf16 as a bf16 matmul's output is. `keep`, `num_warps` and `num_stages` override
    `projection_tiles` and Triton's default (for the benchmark).
    """
    k = len(grads)
    rows, cols = grads.shape[1:] if isinstance(grads, Tensor) else grads[0].shape
    wide = rows <= cols
    rank = projection.shape[1] if wide else projection.shape[2]
    expected = (k, rank, rows) if wide else (k, cols, rank)
    if projection.dtype != torch.bfloat16 or not projection.is_contiguous() or projection.shape != expected:
        # the kernel reads P by its own row-major offsets: anything else would be read wrong, not refused
        raise ValueError(
            f"projection must be a contiguous bf16 {expected}, got {projection.dtype} {tuple(projection.shape)}"
        )
    device = projection.device
    if isinstance(grads, Tensor):  # the views' addresses, without making the views
        step = grads.stride(0) * grads.element_size()
        addresses = tuple(grads.data_ptr() + i * step for i in range(k))
    else:
        addresses = tuple(g.data_ptr() for g in grads)
    r = torch.empty((k, rank, cols) if wide else (k, rows, rank), dtype=torch.float32, device=device)
    norms = torch.empty((k, 1, cols) if wide else (k, rows, 1), dtype=torch.float32, device=device)
    tile, reduce, warps = projection_tiles(rows, cols, k, rank, device)
    grid = (ceil_div(cols if wide else rows, keep or tile), k)
    stages = {} if num_stages is None else {"num_stages": num_stages}
    _projection_kernel[grid](
        _device_table(addresses, device), projection, r, norms, rows, cols, rank, projection.stride(0),
        WIDE=wide, BLOCK_KEEP=keep or tile, BLOCK_REDUCE=reduce, BLOCK_RANK=next_power_of_2(rank),
        DOT_FP32=_interpreted(), num_warps=num_warps or warps, **stages,
    )  # fmt: skip
    return r, norms


def _interpreted() -> bool:
    """Whether kernels run under Triton's interpreter (TRITON_INTERPRET=1), which multiplies the bf16
    operands of `tl.dot` as their raw 16-bit patterns (numpy has no bf16; Triton 3.9): there the projection
    kernel casts them to fp32 first. bf16 products are exact in fp32, so only the order in which a dot tile
    is summed can differ from the GPU's bf16 `tl.dot`."""
    knobs = getattr(triton, "knobs", None)
    return bool(knobs is not None and knobs.runtime.interpret)


if triton is not None:

    @kernel()
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

    @kernel()
    def _projection_kernel(  # type: ignore[no-untyped-def]
        table_ptr, p_ptr, r_ptr, norms_ptr, rows, cols, rank, p_stride,
        WIDE: tl.constexpr, BLOCK_KEEP: tl.constexpr, BLOCK_REDUCE: tl.constexpr, BLOCK_RANK: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        # Program (tile of kept channels, i): R[i]'s tile and the channels' norms, looping once over the
        # reduced dimension. Each G tile is loaded once and feeds both the `tl.dot` with the matching P tile
        # (all ranks at once) and the squares. Squares are summed lane by lane in a full fp32 tile and the
        # lanes added at the end, as `_norms_kernel` does; ranks past `rank` are masked zeros of P.
        t = tl.program_id(1)
        g_ptr = tl.load(table_ptr + t).to(tl.pointer_type(tl.bfloat16))
        p_ptr += t.to(tl.int64) * p_stride
        keep = tl.program_id(0) * BLOCK_KEEP + tl.arange(0, BLOCK_KEEP)
        lane = tl.arange(0, BLOCK_RANK)
        lane_mask = lane < rank
        if WIDE:  # R = P G, (rank, cols); reduce down G's columns; P is (rank, rows)
            keep_mask = keep < cols
            acc = tl.zeros((BLOCK_RANK, BLOCK_KEEP), dtype=tl.float32)
            squares = tl.zeros((BLOCK_REDUCE, BLOCK_KEEP), dtype=tl.float32)
            for start in range(0, rows, BLOCK_REDUCE):
                red = start + tl.arange(0, BLOCK_REDUCE)
                red_mask = red < rows
                g_offs = red.to(tl.int64)[:, None] * cols + keep[None, :]
                g = tl.load(g_ptr + g_offs, mask=red_mask[:, None] & keep_mask[None, :], other=0.0)
                p_offs = lane[:, None] * rows + red[None, :]
                p = tl.load(p_ptr + p_offs, mask=lane_mask[:, None] & red_mask[None, :], other=0.0)
                if DOT_FP32:  # see `_interpreted`
                    acc = tl.dot(p.to(tl.float32), g.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(p, g, acc)
                g32 = g.to(tl.float32)
                squares += g32 * g32
            tl.store(
                norms_ptr + t.to(tl.int64) * cols + keep, tl.sqrt_rn(tl.sum(squares, axis=0)), mask=keep_mask
            )
            r_offs = t.to(tl.int64) * rank * cols + lane[:, None] * cols + keep[None, :]
            tl.store(r_ptr + r_offs, acc, mask=lane_mask[:, None] & keep_mask[None, :])
        else:  # R = G P, (rows, rank); reduce along G's rows; P is (cols, rank)
            keep_mask = keep < rows
            acc = tl.zeros((BLOCK_KEEP, BLOCK_RANK), dtype=tl.float32)
            squares = tl.zeros((BLOCK_KEEP, BLOCK_REDUCE), dtype=tl.float32)
            base = keep.to(tl.int64)[:, None] * cols
            for start in range(0, cols, BLOCK_REDUCE):
                red = start + tl.arange(0, BLOCK_REDUCE)
                red_mask = red < cols
                g = tl.load(
                    g_ptr + base + red[None, :], mask=keep_mask[:, None] & red_mask[None, :], other=0.0
                )
                p_offs = red[:, None] * rank + lane[None, :]
                p = tl.load(p_ptr + p_offs, mask=red_mask[:, None] & lane_mask[None, :], other=0.0)
                if DOT_FP32:
                    acc = tl.dot(g.to(tl.float32), p.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(g, p, acc)
                g32 = g.to(tl.float32)
                squares += g32 * g32
            tl.store(
                norms_ptr + t.to(tl.int64) * rows + keep, tl.sqrt_rn(tl.sum(squares, axis=1)), mask=keep_mask
            )
            r_offs = t.to(tl.int64) * rows * rank + keep.to(tl.int64)[:, None] * rank + lane[None, :]
            tl.store(r_ptr + r_offs, acc, mask=keep_mask[:, None] & lane_mask[None, :])
