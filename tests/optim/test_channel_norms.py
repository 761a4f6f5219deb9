"""The one-launch channel norms of a bucket's separate gradients (optim/kernels.py).

Real: Triton's interpreter (TRITON_INTERPRET=1, in a child process, since it is read when the kernel is
defined) runs `_norms_kernel` on CPU bf16 tensors; each result is compared with the float64 norm of the same
values and with torch's fp32 `vector_norm`. Shapes are chosen so that the kept dimension is not a multiple of
the tile and the reduced one takes several loads and ends in a partial one.
"""

from __future__ import annotations

import pytest
import torch

from hogwild.optim import kernels, rounding
from triton_helpers import interpreted_results

# (rows, cols, k, dim, keep tile or None for the chosen one). dim 1: row norms, dim 0: column norms.
CASES = [
    (37, 600, 3, 1, None),  # 3 loads of 256 columns, the last partial; 2 rows a program
    (37, 600, 1, 1, 16),  # widest row tile, 37 = 2 x 16 + 5
    (300, 100, 2, 1, 8),  # one partial load
    (1, 513, 1, 1, None),  # a single row
    (70, 300, 1, 0, None),  # 3 loads of 32 rows, the last partial; 16 columns a program
    (70, 300, 4, 0, 256),  # widest column tile, 300 = 256 + 44
    (100, 100, 2, 0, 64),  # square: column norms (m <= n)
    (5, 40, 3, 0, 32),  # fewer rows than one load
]

CHILD = """
import torch
from hogwild.optim import kernels

generator = torch.Generator().manual_seed(0)
for index, (rows, cols, k, dim, keep) in enumerate(CASES):
    grads = [(torch.randn(rows, cols, generator=generator) * 10.0 ** (i - 1)).to(torch.bfloat16) for i in range(k)]
    if dim == 1:
        grads[-1][rows // 2, :] = 0  # a row with no gradient
    else:
        grads[-1][:, cols // 2] = 0
    shape = (k, rows, 1) if dim == 1 else (k, 1, cols)
    out = torch.full(shape, float("nan"))
    kernels._fused_channel_norms_(out, grads, dim, keep=keep)
    again = torch.full(shape, float("nan"))
    kernels._fused_channel_norms_(again, grads, dim, keep=keep)
    exact = torch.stack([torch.linalg.vector_norm(g.double(), dim=dim, keepdim=True) for g in grads])
    eager = torch.stack([torch.linalg.vector_norm(g, dim=dim, keepdim=True, dtype=torch.float32) for g in grads])
    rel = ((out.double() - exact).abs() / exact.clamp_min(1e-300)).max().item()
    rel_eager = ((out - eager).abs() / eager.clamp_min(1e-30)).max().item()
    zero = bool((out[-1].flatten()[(rows if dim == 1 else cols) // 2] == 0).item())
    print("RESULT|" + "|".join(map(str, (index, rel, rel_eager, zero, torch.equal(out, again)))))
"""
needs_triton = pytest.mark.skipif(rounding.triton is None, reason="needs triton")


@pytest.fixture(scope="module")
def interpreted() -> dict[int, tuple[float, float, bool, bool]]:
    """case index -> (relative error to float64, relative difference to fp32 vector_norm, zero channel is 0,
    second launch gives the same bits)."""
    out = {}
    for index, rel, rel_eager, zero, same in interpreted_results(f"CASES = {CASES!r}\n{CHILD}"):
        out[int(index)] = (float(rel), float(rel_eager), zero == "True", same == "True")
    return out


@needs_triton
@pytest.mark.parametrize("index", range(len(CASES)), ids=[str(case[:4]) for case in CASES])
def test_the_interpreted_kernel_gives_the_norms_within_fp32_rounding(interpreted: dict, index: int) -> None:
    rel, rel_eager, zero, same = interpreted[index]
    assert rel < 1e-6  # fp32 sums of a few hundred squares: a few units of 2^-24
    assert rel_eager < 1e-6
    assert zero  # a channel with no gradient has norm 0, not NaN or garbage
    assert same


@pytest.mark.parametrize(
    ("rows", "cols", "k", "dim", "tile"),
    [
        (8960, 1536, 14, 1, 16),  # the 1.5B gate/up buckets: 7840 programs
        (8960, 1536, 1, 1, 8),  # one of them: 1120 programs
        (151936, 1536, 1, 1, 16),  # the embedding
        (1536, 8960, 14, 0, 64),  # the 1.5B down buckets: 1960 programs
        (1536, 8960, 1, 0, 16),  # one of them: 560 programs, the narrowest tile
    ],
)
def test_tiles_fill_an_h100(rows: int, cols: int, k: int, dim: int, tile: int) -> None:
    chosen, reduce, warps = kernels.norm_tiles(rows, cols, k, dim, torch.device("cpu"))
    assert chosen == tile
    assert reduce == (kernels._ROW_REDUCE if dim == 1 else kernels._COLUMN_REDUCE)
    assert chosen * reduce // (warps * 32) <= 32  # accumulator registers a thread


def test_cpu_gradients_take_the_per_gradient_norms() -> None:
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(6, 9, generator=generator).to(torch.bfloat16) for _ in range(3)]
    out = torch.empty(3, 6, 1)
    assert not kernels.fusable_norms(out, grads)
    kernels.channel_norms_(out, grads, 1)
    for own, grad in zip(out, grads, strict=True):
        assert torch.equal(own, torch.linalg.vector_norm(grad, dim=1, keepdim=True, dtype=torch.float32))


SCALING_CHILD = """
import torch
from hogwild.optim import buckets, kernels

kernels.fusable_norms = lambda out, grads: True  # CPU tensors through the interpreted kernel
generator = torch.Generator().manual_seed(3)
group = {"scale": 2.0, "scale_type": "channel", "norm_growth_limit": 1.01, "lr": 1e-3}
for k, m, n, rank in ((3, 40, 300, 4), (2, 300, 40, 4)):
    grads = torch.randn(k, m, n, generator=generator).to(torch.bfloat16)
    r_shape = (k, rank, n) if m <= n else (k, m, rank)
    r, r_tilde = torch.randn(r_shape, generator=generator), torch.randn(r_shape, generator=generator)
    out = []
    for given in (grads, list(grads.unbind(0))):
        bucket = buckets.MomentBucket([], r, r, torch.full((k,), 0.5), [])
        out.append(buckets.scaling_factors(given, r, r_tilde, bucket, group))
    rel = ((out[1] - out[0]).abs() / out[0].abs().clamp_min(1e-30)).max().item()
    print(f"RESULT|{m}x{n}|{rel}")
"""


@needs_triton
def test_scaling_factors_of_a_gradient_list_through_the_kernel_match_the_stacked_ones() -> None:
    rels = {shape: float(rel) for shape, rel in interpreted_results(SCALING_CHILD)}
    assert set(rels) == {"40x300", "300x40"}
    assert all(rel < 1e-5 for rel in rels.values()), rels
