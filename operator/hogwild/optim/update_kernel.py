"""The Triton kernel of `rounding._fused_updates_`: decay, update and stochastic rounding of a list of bf16
tensors in one launch, with the random bits of `rounding.random_bits16`.

Apart from rounding.py so that the host side stays short; rounding imports it as `_update_kernel`, and the
bench and tests replace it there.
"""

from __future__ import annotations

from hogwild.optim.triton_jit import kernel

try:  # as in rounding.py: Triton ships with CUDA torch, and the kernel is only an acceleration
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def _splitmix64(z):  # type: ignore[no-untyped-def]
        # `splitmix64` in uint64 arithmetic (wraps mod 2^64 by definition); the constants are its.
        z = z + 0x9E3779B97F4A7C15
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    @triton.jit
    def _noise_keys(seed, step):  # type: ignore[no-untyped-def]
        # `noise_keys(seed, step)`: derive_seed(seed, step, 0x5EED) starts from 0, so 0 ^ seed is the seed.
        z = _splitmix64(seed.to(tl.uint64))
        z = _splitmix64(z ^ step.to(tl.uint64))
        z = _splitmix64(z ^ 0x5EED) >> 1
        return ((z & 0x7FFFFFFF) | 1).to(tl.uint32), ((z >> 32) & 0x7FFFFFFF).to(tl.uint32)

    @kernel(do_not_specialize=["step"])  # a new step must not compile a new variant (step 1, 16, ...)
    def update_kernel(  # type: ignore[no-untyped-def]
        table_ptr, d_base, d_stride, c_ptr, rows, cols, decay, scalar, step,
        COEF: tl.constexpr, STACKED: tl.constexpr, D_BF16: tl.constexpr, DERIVE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(2)
        row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (row < rows)[:, None] & (col < cols)[None, :]
        offs = row.to(tl.int64)[:, None] * cols + col[None, :]
        p_ptr = tl.load(table_ptr + 4 * t).to(tl.pointer_type(tl.bfloat16))
        if STACKED:
            d_ptr = d_base + t.to(tl.int64) * d_stride
        elif D_BF16:
            d_ptr = tl.load(table_ptr + 4 * t + 1).to(tl.pointer_type(tl.bfloat16))
        else:
            d_ptr = tl.load(table_ptr + 4 * t + 1).to(tl.pointer_type(tl.float32))
        if DERIVE:
            key_mul, key_add = _noise_keys(tl.load(table_ptr + 4 * t + 2), step)
        else:
            key_mul = tl.load(table_ptr + 4 * t + 2).to(tl.uint32)
            key_add = tl.load(table_ptr + 4 * t + 3).to(tl.uint32)
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=mask).to(tl.float32)
        if COEF == 1:  # one factor per column
            c = tl.load(c_ptr + t.to(tl.int64) * cols + col, mask=col < cols)[None, :]
        elif COEF == 2:  # one factor per row
            c = tl.load(c_ptr + t.to(tl.int64) * rows + row, mask=row < rows)[:, None]
        elif COEF == 3:  # one factor for the tensor
            c = tl.load(c_ptr + t)
        else:
            c = scalar
        # One rounding of p * decay, then one fused multiply-add, spelled out: that is what the eager path's
        # `mul_` then `addcmul_` / `add_(alpha=)` compute on the CPU, so the two give the same bits. Left to
        # the compiler, `p * decay - d * c` may contract the other product instead (it did on an H100).
        x = tl.fma(-d, c, p * decay)
        # Same hash as random_bits16, in uint32 arithmetic (wraps mod 2^32 by definition).
        h = offs.to(tl.uint32) * key_mul + key_add
        h = (h ^ (h >> 16)) * 0x7FEB352D
        h = (h ^ (h >> 15)) * 0x2C1B3C6D
        h = (h ^ (h >> 16)) & 0xFFFF
        bits = x.to(tl.uint32, bitcast=True) + h
        bits = (bits >> 16) << 16
        tl.store(p_ptr + offs, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)
