"""Step 3 and the channel ratio of step 4 of an APOLLO bucket in one kernel: moments, R~ norms, update norm.

Why: after the projection, the eager step ran ~12 elementwise and reduction kernels over R-sized fp32
tensors per bucket (the AdamW moments: lerp_, mul_, addcmul_, div, sqrt_, add_, div, div_; the ratio: two
norms, clamp, div, where; then the limiter's ||ratio * channel norms of G||): ~1.5 ms of GPU time at 1.5B
on an H100 and ~300 launches a step, when the step is partly host-bound. Here each bucket is one launch
that reads R and the two moments once, writes the moments back, and never writes R~: only its per-channel
norm is needed, and that is summed while R~ is still in registers.

The tile: one program owns `channel block` channels of one member and loops over their `rank` entries in
loads of at most `_RANK_BLOCK` (one load at the default rank 64; a non-power-of-two rank is masked). R is
(k, rank, n) for a wide weight (a channel is a column, read as `channel block` contiguous floats a row) or
(k, m, rank) for a tall one (a channel is a row, read contiguously). Each channel's sums run in one fixed
order and each program writes its own slots: no atomics, the same bits from run to run.

The formulas are `buckets.adam_normalized` and `buckets._norm_ratio`, which stay the reference and what runs
on CPU, without Triton, for the tensor-wise scale type and for anything `fusable` refuses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hogwild.optim.rounding import ceil_div, next_power_of_2
from hogwild.optim.triton_jit import kernel

try:  # as in rounding.py: Triton ships with CUDA torch, and these kernels are only an acceleration
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Most rank entries a program loads at once: the default rank 64 is one load. With `_TILE_ELEMENTS` it sets
# the channel block (32 channels at rank 64: a 128-byte row segment of a wide R, 8 KiB contiguous of a tall
# one); larger ranks take several loads of the same tile, so registers do not grow with the rank.
_RANK_BLOCK = 64
# Elements of one load: 16 fp32 values a thread per tensor at 4 warps, with R, both moments and the two
# accumulators live at once.
_TILE_ELEMENTS = 2048
_MOST_CHANNELS = 256  # the channel block of ranks up to 8, so that a small rank still gives a grid
_WARPS = 4
_LIMITER_BLOCK = 1024  # channels a load of `_limiter_kernel`: 8 fp32 a thread at 4 warps
# Device copies of the bias corrections, by (device, betas, steps): the buckets of a step mostly share
# their members' step counts, so a step copies one small tensor per distinct bucket size, not per bucket.
# Shared, so read-only: a caller that updates corrections in place (a captured graph) keeps its own.
_CORRECTIONS: dict[tuple[torch.device, float, float, tuple[int, ...]], Tensor] = {}
_CORRECTIONS_KEPT = 64


def fusable(r: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, channel_norms: Tensor | None, dim: int) -> bool:
    """Whether `moments_and_ratio_` takes these: Triton importable, CUDA, fp32, contiguous, one (k, a, b)
    shape for R and the moments, and (when given) channel norms shaped as the ratio, on the same device."""
    if triton is None or not r.is_cuda or r.dim() != 3 or r.numel() == 0 or dim not in (1, 2):
        return False
    tensors = [r, exp_avg, exp_avg_sq] + ([] if channel_norms is None else [channel_norms])
    if not all(t.dtype == torch.float32 and t.is_contiguous() and t.device == r.device for t in tensors):
        return False
    if channel_norms is not None and channel_norms.shape != ratio_shape(r, dim):
        return False
    return exp_avg.shape == r.shape and exp_avg_sq.shape == r.shape


def ratio_shape(r: Tensor, dim: int) -> tuple[int, int, int]:
    """(k, 1, n) for R (k, rank, n) reduced along `dim` 1, (k, m, 1) for R (k, m, rank) along 2."""
    k, rows, cols = r.shape
    return (k, 1, cols) if dim == 1 else (k, rows, 1)


def bias_corrections(steps: Sequence[int], betas: tuple[float, float], device: torch.device) -> Tensor:
    """(2, k) fp32 on `device`: 1 - beta1^t and 1 - beta2^t of each member's step count t.

    A device tensor rather than kernel scalars, so that members at different steps share a launch (and a
    captured CUDA graph could update it in place). The values are those `adam_normalized` divides by: the
    Python doubles rounded once to fp32.
    """
    beta1, beta2 = betas
    key = (device, float(beta1), float(beta2), tuple(steps))
    cached = _CORRECTIONS.get(key)
    if cached is not None:
        return cached
    host = torch.tensor([[1 - beta1**t for t in steps], [1 - beta2**t for t in steps]], dtype=torch.float32)
    # non_blocking: a blocking copy from pageable memory would wait for the GPU to drain the stream.
    corrections = host.to(device, non_blocking=True)
    if len(_CORRECTIONS) >= _CORRECTIONS_KEPT:
        del _CORRECTIONS[next(iter(_CORRECTIONS))]
    _CORRECTIONS[key] = corrections
    return corrections


def tiles(rank: int) -> tuple[int, int]:
    """(rank block, channel block) of one load: the rank padded to a power of two up to `_RANK_BLOCK`, and
    as many channels as fill `_TILE_ELEMENTS` (at most `_MOST_CHANNELS`)."""
    rank_block = min(next_power_of_2(rank), _RANK_BLOCK)
    return rank_block, min(_TILE_ELEMENTS // rank_block, _MOST_CHANNELS)


def moments_and_ratio_(
    r: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    corrections: Tensor,
    *,
    dim: int,
    betas: tuple[float, float],
    eps: float,
    channel_norms: Tensor | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """The AdamW moments of R (k, rank, n) or (k, m, rank) into `exp_avg` and `exp_avg_sq`, in place; returns
    (ratio, update norm).

    ratio is ||R~_j|| / ||R_j|| over the rank dimension `dim` (1 or 2) of R, kept as size 1, and 0 where
    ||R_j|| is 0 (see `buckets._norm_ratio`), with R~ = M^ / (sqrt(V^) + eps) and the bias corrections of
    `bias_corrections`. Given `channel_norms` (the norms of G, shaped as the ratio), the update norm is
    scale * ||ratio * channel_norms|| per member, (k,) fp32; else None.

    Each program writes the norm of its own channels' share (times `scale`), and one `vector_norm` of those
    k rows gives the update norms: a fixed summation order, and one launch instead of a sum and a sqrt.
    """
    k = r.shape[0]
    assert corrections.shape == (2, k) and corrections.is_contiguous(), "see bias_corrections"
    rank, channels = (r.shape[1], r.shape[2]) if dim == 1 else (r.shape[2], r.shape[1])
    rank_block, channel_block = tiles(rank)
    programs = ceil_div(channels, channel_block)
    ratio = torch.empty(ratio_shape(r, dim), dtype=torch.float32, device=r.device)
    with_norms = channel_norms is not None
    partial_norms = torch.empty((k, programs) if with_norms else (1,), dtype=torch.float32, device=r.device)
    beta1, beta2 = betas
    _moments_kernel[(programs, k)](
        r, exp_avg, exp_avg_sq, corrections, ratio, channel_norms if with_norms else ratio, partial_norms,
        rank, channels, 1 - beta1, beta2, 1 - beta2, eps, scale,
        WIDE=dim == 1, WITH_NORMS=with_norms, RANK_BLOCK=rank_block, CHANNEL_BLOCK=channel_block,
        num_warps=_WARPS,
    )  # fmt: skip
    update_norm = torch.linalg.vector_norm(partial_norms, dim=1) if with_norms else None
    return ratio, update_norm


def limiter_fusable(ratio: Tensor, previous: Tensor, update_norm: Tensor) -> bool:
    """Whether `limit_and_scale_` takes these: Triton, CUDA, fp32 and contiguous, one norm per member."""
    if triton is None or not ratio.is_cuda or ratio.dim() != 3:
        return False
    k = (ratio.shape[0],)
    tensors = (ratio, previous, update_norm)
    if not all(t.dtype == torch.float32 and t.is_contiguous() and t.device == ratio.device for t in tensors):
        return False
    return previous.shape == k and update_norm.shape == k


def limit_and_scale_(
    ratio: Tensor, previous: Tensor, update_norm: Tensor, limit: float | None, lr_scale: float
) -> Tensor:
    """Step 6 (the norm-growth limiter) and the learning rate, in place; returns `ratio`.

    The limiter of `buckets.scaling_factors`, in its order and roundings, for the ratio (k, 1, n) or (k, m, 1):
    factor = 1 where previous <= 0, else min(limit * previous / update norm, 1); previous <- update norm *
    factor; ratio <- ratio * factor * lr_scale (without a limit: previous <- update norm, ratio <- ratio *
    lr_scale). One launch where the torch ops were 8 a bucket, each ~10 us of host time at 1.5B.
    """
    k = ratio.shape[0]
    _limiter_kernel[(k,)](
        ratio, previous, update_norm, ratio.numel() // k, 1.0 if limit is None else float(limit),
        float(lr_scale), LIMIT=limit is not None, BLOCK=_LIMITER_BLOCK, num_warps=_WARPS,
    )  # fmt: skip
    return ratio


if triton is not None:

    @kernel()
    def _limiter_kernel(  # type: ignore[no-untyped-def]
        ratio_ptr, previous_ptr, norm_ptr, channels, limit, lr_scale,
        LIMIT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One program per member: it alone reads and writes its `previous`, so there is no race.
        member = tl.program_id(0)
        norm = tl.load(norm_ptr + member)
        if LIMIT:
            previous = tl.load(previous_ptr + member)
            capped = tl.div_rn(limit * previous, norm)
            capped = tl.where(capped > 1.0, 1.0, capped)  # clamp(max=1): a NaN stays NaN, as torch's
            factor = tl.where(previous > 0, capped, 1.0)
            tl.store(previous_ptr + member, norm * factor)
        else:
            factor = 1.0
            tl.store(previous_ptr + member, norm)
        base = member.to(tl.int64) * channels
        for start in range(0, channels, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < channels
            value = tl.load(ratio_ptr + base + offsets, mask=mask)
            if LIMIT:
                value = value * factor
            tl.store(ratio_ptr + base + offsets, value * lr_scale, mask=mask)

    @kernel()
    def _moments_kernel(  # type: ignore[no-untyped-def]
        r_ptr, exp_avg_ptr, exp_avg_sq_ptr, corrections_ptr, ratio_ptr, channel_norms_ptr, partial_norms_ptr,
        rank, channels, lerp_weight, beta2, one_minus_beta2, eps, scale,
        WIDE: tl.constexpr, WITH_NORMS: tl.constexpr, RANK_BLOCK: tl.constexpr, CHANNEL_BLOCK: tl.constexpr,
    ):  # fmt: skip
        block, member = tl.program_id(0), tl.program_id(1)
        channel = block * CHANNEL_BLOCK + tl.arange(0, CHANNEL_BLOCK)
        channel_mask = channel < channels
        base = member.to(tl.int64) * rank * channels
        bias1 = tl.load(corrections_ptr + member)
        bias2 = tl.load(corrections_ptr + tl.num_programs(1) + member)
        # Squares summed in full tiles (rank lane, channel) and reduced across lanes once at the end.
        sum_r = tl.zeros((RANK_BLOCK, CHANNEL_BLOCK), dtype=tl.float32)
        sum_r_tilde = tl.zeros((RANK_BLOCK, CHANNEL_BLOCK), dtype=tl.float32)
        for start in range(0, rank, RANK_BLOCK):
            row = start + tl.arange(0, RANK_BLOCK)
            mask = (row < rank)[:, None] & channel_mask[None, :]
            if WIDE:  # (rank, n): a channel is a column
                offsets = base + row[:, None] * channels + channel[None, :]
            else:  # (m, rank): a channel is a row
                offsets = base + channel[None, :] * rank + row[:, None]
            r = tl.load(r_ptr + offsets, mask=mask, other=0.0)
            m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
            v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
            # torch's lerp: the form that is exact at its end for the weight's side of 0.5.
            m = tl.where(lerp_weight < 0.5, m + lerp_weight * (r - m), r - (r - m) * (1.0 - lerp_weight))
            v = v * beta2 + one_minus_beta2 * r * r
            tl.store(exp_avg_ptr + offsets, m, mask=mask)
            tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
            # IEEE division and square root (Triton's defaults are approximate), in adam_normalized's order;
            # masked lanes hold 0 / eps = 0.
            denom = tl.sqrt_rn(tl.div_rn(v, bias2)) + eps
            r_tilde = tl.div_rn(tl.div_rn(m, denom), bias1)
            sum_r += r * r
            sum_r_tilde += r_tilde * r_tilde
        norm_r = tl.sqrt_rn(tl.sum(sum_r, axis=0))
        norm_r_tilde = tl.sqrt_rn(tl.sum(sum_r_tilde, axis=0))
        # As _norm_ratio: the divisor clamped at the smallest normal fp32, and 0 where R is 0 (divided by 1
        # there, not by the clamp: moments without R would overflow to an inf that is thrown away anyway).
        divisor = tl.where(norm_r > 0, tl.maximum(norm_r, 1.1754943508222875e-38), 1.0)
        ratio = tl.where(norm_r > 0, tl.div_rn(norm_r_tilde, divisor), 0.0)
        out = member.to(tl.int64) * channels + channel
        tl.store(ratio_ptr + out, ratio, mask=channel_mask)
        if WITH_NORMS:
            grad_norms = tl.load(channel_norms_ptr + out, mask=channel_mask, other=0.0)
            scaled = ratio * grad_norms
            share = tl.sqrt_rn(tl.sum(scaled * scaled, axis=0)) * scale
            tl.store(partial_norms_ptr + member.to(tl.int64) * tl.num_programs(0) + block, share)
