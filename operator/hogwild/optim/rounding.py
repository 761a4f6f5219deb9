"""Writing fp32 updates into bf16 weights in place without losing them.

bf16 keeps 8 significant bits: an update smaller than about 2^-9 of a weight rounds back to the same weight,
so fine-tuning at a small learning rate silently does nothing (docs/facts.md, "Precision"). Two cures, both
writing into the parameter's own storage (`copy_`, or the fused kernel's stores), because vLLM reads that
exact memory:

- stochastic rounding (default): round up with probability equal to the distance from the lower bf16
  neighbour, so the stored value equals the fp32 value in expectation and small updates accumulate.
- Kahan compensation: a per-parameter buffer keeps what rounding dropped and adds it back next step.

The random bits are a counter-based hash of (element index, key), not a generator stream. The key comes from
integers the optimizer state already holds (per-parameter seed and step), so a resumed run is bit-identical
without saving any generator, and the eager path and the fused Triton kernel draw the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

try:  # Triton ships with CUDA torch; the fused kernel (update_kernel.py) is only an acceleration.
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
# Multipliers of the 32-bit mixer. Both are odd and below 2^31, so that the eager path's int64 products
# never overflow and the Triton kernel's uint32 arithmetic sees them as 32-bit values.
_MIX1 = 0x7FEB352D
_MIX2 = 0x2C1B3C6D
_BLOCK_M, _BLOCK_N = 8, 256
_NO_COEF, _COLUMN_COEFS, _ROW_COEFS, _ONE_COEF = 0, 1, 2, 3
# Device copies of the fused kernel's pointer tables, by content (see `_device_table`): a model has a few
# dozen buckets, and a table whose gradients move each step is dropped after this many newer ones.
_TABLES: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}
_TABLES_KEPT = 256


def ceil_div(value: int, divisor: int) -> int:
    """`triton.cdiv` for host code: Triton's is a `constexpr_function`, ~3 us a call on the step's host."""
    return -(-value // divisor)


def next_power_of_2(value: int) -> int:
    """`triton.next_power_of_2` for host code (positive values), without its ~3 us a call."""
    return 1 << (value - 1).bit_length()


@dataclass
class UpdateCache:
    """What the fused update works out from one list of parameters, kept for the next call (a bucket's).

    Why: at 1.5B the step's host time exceeded its GPU time, and checking every parameter's dtype, layout
    and shape and rebuilding the pointer table each step was a good part of it. Valid while `params` is the
    same list object, of parameters at the same addresses (`pointers`): a parameter whose storage moved
    (`p.data = ...`) makes everything be worked out again. A parameter's dtype, shape and layout are taken to
    change only with its storage, as the optimizer's plan takes them (plan.py).
    """

    params: Sequence[Tensor] | None = None
    pointers: tuple[int, ...] = ()
    fusable: bool = False  # the parameters' part of `_fusable`
    seeds: tuple[int, ...] = ()  # what `seed_table` holds besides the pointers
    seed_table: Tensor | None = None  # the table of a stacked direction with keys derived on the device

    def current(self, params: Sequence[Tensor]) -> bool:
        return self.params is params and tuple(map(Tensor.data_ptr, params)) == self.pointers

    def reset(self, params: Sequence[Tensor], fusable: bool) -> None:
        self.params, self.pointers, self.fusable = params, tuple(map(Tensor.data_ptr, params)), fusable
        self.seeds, self.seed_table = (), None


def splitmix64(value: int) -> int:
    """One step of the SplitMix64 mixer on Python ints: a well-spread 64-bit value from any integer."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*values: int) -> int:
    """A non-negative 63-bit seed from a tuple of integers (fits `torch.Generator.manual_seed`)."""
    z = 0
    for value in values:
        z = splitmix64(z ^ (value & _MASK64))
    return z >> 1


def noise_keys(seed: int, step: int) -> tuple[int, int]:
    """The two 31-bit keys of the rounding noise for one parameter at one step: (odd multiplier, offset)."""
    z = derive_seed(seed, step, 0x5EED)
    return (z & 0x7FFFFFFF) | 1, (z >> 32) & 0x7FFFFFFF


def random_bits16(shape: torch.Size | tuple[int, ...], keys: tuple[int, int], device: torch.device) -> Tensor:
    """16 uniform random bits per element (int32 in [0, 65536)), a pure function of (index, keys).

    The hash is a 32-bit integer mixer applied to `index * keys[0] + keys[1]` (mod 2^32); the Triton kernel
    computes exactly the same bits in uint32 arithmetic.
    """
    numel = 1
    for size in shape:
        numel *= size
    x = torch.arange(numel, dtype=torch.int64, device=device).bitwise_and_(_MASK32)
    x.mul_(keys[0]).add_(keys[1]).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16).mul_(_MIX1).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15).mul_(_MIX2).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16)
    return x.bitwise_and_(0xFFFF).to(torch.int32).view(shape)


def stochastic_round_bf16_(value: Tensor, keys: tuple[int, int]) -> Tensor:
    """Round an fp32 tensor in place to bf16-representable values, stochastically; returns it.

    Adding 16 random bits below the bf16 mantissa and truncating them rounds the magnitude up with
    probability (distance to the lower neighbour) / (gap between neighbours): unbiased.
    """
    if value.dtype != torch.float32:
        raise TypeError(f"stochastic rounding takes an fp32 tensor, got {value.dtype}")
    bits = value.view(torch.int32)
    bits.add_(random_bits16(value.shape, keys, value.device))
    bits.bitwise_and_(-65536)  # 0xFFFF0000: keep sign, exponent and the 7 stored mantissa bits
    return value


def kahan_round_(value: Tensor, compensation: Tensor, dtype: torch.dtype) -> Tensor:
    """Round `value` (fp32, modified) to `dtype`, carrying what rounding dropped over to the next call.

    Returns the rounded tensor; `compensation` (any float dtype) then holds the dropped part.
    """
    value.add_(compensation)
    rounded = value.to(dtype)
    compensation.copy_(value.sub_(rounded))
    return rounded


def apply_update_(
    param: Tensor,
    direction: Tensor,
    coef: Tensor | float,
    *,
    decay: float,
    rounding: str,
    keys: tuple[int, int],
    compensation: Tensor | None = None,
) -> None:
    """`param <- round(param * decay - direction * coef)`, written in place into `param`'s storage.

    `coef` is a float or a tensor that broadcasts against `param` (a row or column of channel factors).
    The arithmetic is fp32; `rounding` picks how the result goes back into a bf16/fp16 parameter
    ("stochastic" applies to bf16 only; fp16 rounds to nearest). fp32/fp64 parameters are updated exactly.
    """
    coefs = coef.unsqueeze(0) if isinstance(coef, Tensor) else coef
    apply_updates_(
        [param], [direction], coefs, decay=decay, rounding=rounding, keys=[keys], compensations=[compensation]
    )


def apply_updates_(
    params: Sequence[Tensor],
    directions: Sequence[Tensor] | Tensor,
    coefs: Tensor | float,
    *,
    decay: float,
    rounding: str,
    compensations: Sequence[Tensor | None],
    keys: Sequence[tuple[int, int]] | None = None,
    seeds: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    cache: UpdateCache | None = None,
) -> None:
    """`apply_update_` for parameters of one shape: `directions[i]` and `coefs[i]` (or the float) go with
    `params[i]`; `directions` may be one stacked (k, ...) tensor. The noise of `params[i]` is `keys[i]`, or
    `noise_keys(seeds[i], steps[i])`.

    On CUDA with Triton, bf16 stochastic rounding is one kernel launch for the whole list: it reads each
    parameter and direction once and writes the parameter once, with the same random bits as the eager path.
    Given seeds and one step for all, the kernel derives the keys itself, so that its pointer table stays the
    same from step to step (see `_fused_updates_`). `cache`, passed again with the same `params` list each
    call, keeps what depends only on the parameters (see `UpdateCache`); the result is the same without it.
    """
    fused = bool(params) and _fusable(params, directions, coefs, rounding, cache)
    if keys is None:
        if seeds is None or steps is None:
            raise ValueError("apply_updates_ needs keys, or seeds and steps")
        if fused and steps.count(steps[0]) == len(steps):
            _fused_updates_(params, directions, coefs, decay, seeds, steps[0], cache=cache)
            return
        keys = [noise_keys(seed, step) for seed, step in zip(seeds, steps, strict=True)]
    if fused:
        _fused_updates_(params, directions, coefs, decay, keys, None)
        return
    for i, (param, key, compensation) in enumerate(zip(params, keys, compensations, strict=True)):
        coef = coefs[i] if isinstance(coefs, Tensor) else coefs
        _eager_update_(param, directions[i], coef, decay, rounding, key, compensation)


def _eager_update_(
    param: Tensor,
    direction: Tensor,
    coef: Tensor | float,
    decay: float,
    rounding: str,
    keys: tuple[int, int],
    compensation: Tensor | None,
) -> None:
    exact = param.dtype in (torch.float32, torch.float64)
    value = param if exact else param.float()
    if decay != 1.0:
        value.mul_(decay)
    if isinstance(coef, Tensor):
        value.addcmul_(direction, coef, value=-1)
    else:
        value.add_(direction, alpha=-coef)
    if exact:
        return
    if rounding == "kahan" and compensation is not None:
        param.copy_(kahan_round_(value, compensation, param.dtype))
    elif rounding == "stochastic" and param.dtype == torch.bfloat16:
        param.copy_(stochastic_round_bf16_(value, keys))
    else:
        param.copy_(value)


def _fusable(
    params: Sequence[Tensor],
    directions: Sequence[Tensor] | Tensor,
    coefs: Tensor | float,
    rounding: str,
    cache: UpdateCache | None = None,
) -> bool:
    """Whether `_fused_updates_` takes these; with `cache`, the parameters' part is looked at once, then
    again only when the cache is no longer current (which this makes it again)."""
    first = params[0]
    if triton is None or rounding != "stochastic" or not first.is_cuda:
        return False
    if isinstance(coefs, Tensor) and (coefs.dtype != torch.float32 or not coefs.is_contiguous()):
        return False
    if cache is not None and cache.current(params):
        params_fusable = cache.fusable
    else:
        params_fusable = all(
            p.dtype == torch.bfloat16
            and p.is_contiguous()
            and p.shape == first.shape
            and p.device == first.device
            for p in params
        )
        if cache is not None:
            cache.reset(params, params_fusable)
    if not params_fusable:
        return False
    if isinstance(directions, Tensor):
        stacked_ok = directions.is_contiguous() and directions.shape[1:] == first.shape
        return stacked_ok and directions.dtype in (torch.bfloat16, torch.float32)
    dtype = directions[0].dtype
    return dtype in (torch.bfloat16, torch.float32) and all(
        d.dtype == dtype and d.is_contiguous() and d.shape == first.shape for d in directions
    )


def _matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """A contiguous tensor as (rows, cols): 2-D as is, 1-D as one row, more dimensions flattened behind."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    cols = 1
    for size in shape[1:]:
        cols *= size
    return shape[0], cols


def _device_table(rows: tuple[int, ...], device: torch.device) -> Tensor:
    """`rows` as an int64 tensor on `device`, made once per distinct content and then reused.

    Why: a bucket's table (parameter addresses, seeds) is the same every step, and making it costs a host
    allocation, a pinned copy and a copy launch. The cache is keyed by the content, so a hit is exactly the
    table a fresh copy would give. A miss copies from a fresh pinned tensor (the caching host allocator does
    not hand that block out again before the copy from it is done), so no pending copy reads rewritten memory.
    """
    key = (device, rows)
    table = _TABLES.pop(key, None)  # popped and put back: the dict's order is the least recently used first
    if table is None:
        host = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()  # so that the copy does not wait for the GPU to drain
        table = host.to(device, non_blocking=True)
        while len(_TABLES) >= _TABLES_KEPT:
            del _TABLES[next(iter(_TABLES))]
    _TABLES[key] = table
    return table


def _table_rows(
    params: Sequence[Tensor],
    directions: Sequence[Tensor] | Tensor | None,
    noise: Sequence[tuple[int, int]] | Sequence[int],
) -> tuple[int, ...]:
    """`_update_kernel`'s table: one row per tensor of parameter address, direction address (0 when the
    directions are stacked, `directions` None), then the seed and 0, or the two noise keys."""
    if len(noise) != len(params) or (directions is not None and len(directions) != len(params)):
        raise ValueError("one direction and one seed or pair of keys per parameter")
    flat = [0] * (4 * len(params))
    flat[0::4] = map(Tensor.data_ptr, params)
    if directions is not None:
        flat[1::4] = map(Tensor.data_ptr, directions)
    if noise and isinstance(noise[0], int):
        flat[2::4] = cast("Sequence[int]", noise)
    else:
        keys = cast("Sequence[tuple[int, int]]", noise)
        flat[2::4] = [key[0] for key in keys]
        flat[3::4] = [key[1] for key in keys]
    return tuple(flat)


def _fused_updates_(
    params: Sequence[Tensor],
    directions: Sequence[Tensor] | Tensor,
    coefs: Tensor | float,
    decay: float,
    noise: Sequence[tuple[int, int]] | Sequence[int],
    step: int | None,
    *,
    tiles: tuple[int, int] = (_BLOCK_M, _BLOCK_N),
    num_warps: int | None = None,
    cache: UpdateCache | None = None,
) -> None:
    """Launch `_update_kernel` once over the list: program (row tile, column tile, i) updates `params[i]`.

    `noise` is each parameter's keys (`step` None), or its seed, the kernel deriving the keys of `step` as
    `noise_keys` does. A stacked `directions` is passed as one tensor: with seeds, the table then holds only
    what stays the same from step to step. `tiles` (rows, columns) and `num_warps` (Triton's default when None)
    are for bench/gpu_kernels.py: each element's result does not depend on them. `cache` must be current for
    `params` (`_fusable` makes it so): it keeps the table of a stacked direction with seeds between calls.
    """
    first = params[0]
    if first.numel() == 0:
        return
    rows, cols = _matrix_shape(first.shape)
    stacked = isinstance(directions, Tensor)
    d_bf16 = (directions if isinstance(directions, Tensor) else directions[0]).dtype == torch.bfloat16
    if cache is not None and stacked and step is not None:
        seeds = tuple(cast("Sequence[int]", noise))
        if cache.seed_table is None or cache.seeds != seeds:
            cache.seeds, cache.seed_table = (
                seeds,
                _device_table(_table_rows(params, None, noise), first.device),
            )
        table = cache.seed_table
    else:
        table = _device_table(_table_rows(params, None if stacked else directions, noise), first.device)
    d_arg, d_stride = (directions, directions.stride(0)) if isinstance(directions, Tensor) else (table, 0)
    # (a stacked direction is read from its own address: the table need not change when it moves)
    scalar, coef_arg, coef_kind = 1.0, table, _NO_COEF
    if isinstance(coefs, Tensor):
        coef_arg = coefs
        per_tensor = coefs.shape[1:]
        if per_tensor.numel() == 1:
            coef_kind = _ONE_COEF
        elif per_tensor[-1] == cols and per_tensor.numel() == cols:
            coef_kind = _COLUMN_COEFS  # a (1, n) row: one factor per column
        else:
            coef_kind = _ROW_COEFS  # an (m, 1) column: one factor per row
    else:
        scalar = float(coefs)
    block_m, block_n = tiles
    grid = (ceil_div(rows, block_m), ceil_div(cols, block_n), len(params))
    _update_kernel[grid](
        table, d_arg, d_stride, coef_arg, rows, cols, float(decay), scalar, 0 if step is None else step,
        COEF=coef_kind, STACKED=stacked, D_BF16=d_bf16, DERIVE=step is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, **({} if num_warps is None else {"num_warps": num_warps}),
    )  # fmt: skip


if triton is not None:
    from hogwild.optim.update_kernel import update_kernel as _update_kernel
