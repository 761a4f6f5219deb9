"""The projection R = P G (or G P) and the channel norms of G in one pass over G (optim/kernels.py).

Real: Triton's interpreter (TRITON_INTERPRET=1, in a child process, since it is read when the kernel is
defined) runs `_projection_kernel` on CPU bf16 tensors, and on a GPU the compiled kernel runs on CUDA ones;
both are judged by the same functions below against float64 results of the same bf16 inputs. An APOLLO step
through the kernel (forced onto CPU tensors under the interpreter; its own choice on CUDA) is judged against
the float64 reference of the paper's algorithm in bench/gpu_reference.py.

Bounds. R: each entry is an fp32 sum of at most 1536 products of bf16 values here (the reduced side), each
product exact in fp32; with random signs the rounding error grows like sqrt(terms) * 2^-24 ~ 2e-6 of ||R||,
so R_MAX = 1e-5: 100x under the 1e-3 band of fp32 results, and ~100x under what rounding R to bf16 shows
(~1e-3, the bmm path's), so it also proves R is not rounded. Norms: squares of bf16 values are exact in fp32
and all positive, so a sum's relative error is at most (additions in its chain) * 2^-24: at most 24 a lane
plus 6 across the 64 lanes here, half of that in the square root, plus its own rounding: under 1e-6 for
every case, so NORM_MAX = 4e-6.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from gpu_reference import BF16_MAX, ApolloSettings, reference_apollo, relative_error
from hogwild.optim import Apollo, kernels, rounding
from triton_helpers import ROOT, interpreted_results

R_MAX = 1e-5
NORM_MAX = 4e-6

# (k, rows, cols, rank, kept tile or None for `projection_tiles`'). Wide (rows <= cols) reduce over rows
# in loads of 64, tall ones over cols; shapes end in partial tiles both ways.
CASES = [
    (3, 150, 70, 16, None),  # tall: 2 loads (64 + 6), 10 row tiles of 16 (the last of 6)
    (1, 150, 70, 16, 64),  # tall, one gradient, 150 = 2 x 64 + 22
    (2, 40, 300, 24, None),  # wide: one partial load; rank 24 padded to 32; 300 = 18 x 16 + 12
    (4, 130, 200, 64, 128),  # wide at the default rank: 3 loads (64, 64, 2), 200 = 128 + 72
    (2, 100, 100, 32, 32),  # square: wide
    (1, 90, 17, 16, None),  # tall, fewer columns than one load
]
# Shapes of the 1.5B model, for the compiled kernel with the tiles it picks.
GPU_CASES = [(4, 1536, 1536, 64, None), (2, 8960, 1536, 64, None), (2, 1536, 8960, 64, None), (3, 256, 1536, 64, None)]  # fmt: skip

KERNEL_CHILD = f"""
import json, sys
sys.path[:0] = [{str(ROOT / "tests" / "optim")!r}, {str(ROOT / "tests")!r}]
from test_projection_kernel import CASES, kernel_case
for index, case in enumerate(CASES):
    print(f"RESULT|{{index}}|{{json.dumps(kernel_case(*case, device='cpu'))}}")
"""
needs_triton = pytest.mark.skipif(rounding.triton is None, reason="needs triton")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def kernel_case(k: int, rows: int, cols: int, rank: int, keep: int | None, device: str) -> dict[str, Any]:
    """The kernel's R and norms of one case against float64, and the checks that need no reference."""
    generator = torch.Generator().manual_seed(1000 * k + rows + cols + rank)
    wide = rows <= cols
    # 1e-4, 1, 1e4: gradients whose norms are 8 orders of magnitude apart in one launch.
    scales = [10.0 ** (4 * (i % 3) - 4) for i in range(k)]
    grads = torch.stack([torch.randn(rows, cols, generator=generator) * s for s in scales])
    if wide:
        grads[-1, :, cols // 2] = 0  # a channel with no gradient
    else:
        grads[-1, rows // 2, :] = 0
    grads = grads.to(device, torch.bfloat16)
    projection_shape = (k, rank, rows) if wide else (k, cols, rank)
    projection = (torch.randn(projection_shape, generator=generator) / math.sqrt(rank)).to(
        device, torch.bfloat16
    )

    r, norms = kernels.project_with_norms(projection, grads, keep=keep)
    again = kernels.project_with_norms(projection, grads, keep=keep)
    separate = kernels.project_with_norms(projection, [g.clone() for g in grads], keep=keep)
    exact_r = (
        torch.bmm(projection.double(), grads.double())
        if wide
        else torch.bmm(grads.double(), projection.double())
    )
    exact_norms = torch.linalg.vector_norm(grads.double(), dim=1 if wide else 2, keepdim=True)
    nonzero = exact_norms > 0
    norm_errors = (norms.double() - exact_norms).abs()[nonzero] / exact_norms[nonzero]
    zero_r = r[-1, :, cols // 2] if wide else r[-1, rows // 2, :]
    zero_norm = norms[-1, 0, cols // 2] if wide else norms[-1, rows // 2, 0]
    return {
        "r_error": max(relative_error(own, exact) for own, exact in zip(r, exact_r, strict=True)),
        "norm_error": float(norm_errors.max()),
        "zero_channel": bool(zero_norm == 0) and bool((zero_r == 0).all()),
        "same_bits": torch.equal(r, again[0]) and torch.equal(norms, again[1]),
        "table_route": torch.equal(r, separate[0]) and torch.equal(norms, separate[1]),
        "shapes": [list(r.shape), list(norms.shape)],
    }  # fmt: skip


def expected_shapes(k: int, rows: int, cols: int, rank: int) -> list[list[int]]:
    return [[k, rank, cols], [k, 1, cols]] if rows <= cols else [[k, rows, rank], [k, rows, 1]]


@pytest.fixture(scope="module")
def interpreted() -> dict[int, dict[str, Any]]:
    return {int(index): json.loads(result) for index, result in interpreted_results(KERNEL_CHILD)}


@needs_triton
@pytest.mark.parametrize("index", range(len(CASES)), ids=[str(case) for case in CASES])
def test_the_interpreted_kernel_gives_r_and_norms_to_fp32_accuracy(
    interpreted: dict[int, dict[str, Any]], index: int
) -> None:
    result = interpreted[index]
    assert result["shapes"] == expected_shapes(*CASES[index][:4])
    assert result["r_error"] < R_MAX
    assert result["norm_error"] < NORM_MAX
    assert result["zero_channel"]  # norm exactly 0 and R exactly 0, not NaN or garbage
    assert result["same_bits"]
    assert result["table_route"]  # a stacked buffer's views and separate tensors: the same bits


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", CASES + GPU_CASES, ids=[str(case) for case in CASES + GPU_CASES])
def test_the_compiled_kernel_gives_r_and_norms_to_fp32_accuracy(case: tuple) -> None:
    result = kernel_case(*case, device="cuda")
    assert result["shapes"] == expected_shapes(*case[:4])
    assert result["r_error"] < R_MAX, result
    assert result["norm_error"] < NORM_MAX, result
    assert result["zero_channel"] and result["same_bits"] and result["table_route"], result


# (k, rows, cols, rank, kept tile, programs): the docstring of `projection_tiles`, on an H100.
TILE_CASES = [
    (28, 1536, 1536, 64, 64, 672),
    (28, 256, 1536, 64, 64, 672),
    (14, 8960, 1536, 64, 128, 980),
    (14, 1536, 8960, 64, 128, 980),
    (1, 8960, 1536, 64, 16, 560),
    (1, 151936, 1536, 64, 128, 1187),
    (19, 3584, 3584, 64, 128, 532),
    (28, 512, 3584, 64, 128, 784),
    (3, 18944, 3584, 64, 64, 888),
    (3, 3584, 18944, 64, 64, 888),
    (1, 152064, 3584, 64, 128, 1188),
    (14, 8960, 1536, 256, 64, 1960),  # the largest rank: the accumulator caps the tile
]


@pytest.mark.parametrize(("k", "rows", "cols", "rank", "tile", "programs"), TILE_CASES)
def test_tiles_fill_an_h100(k: int, rows: int, cols: int, rank: int, tile: int, programs: int) -> None:
    # On CPU `_sm_count` is an H100's 132, so these are the tiles a GPU picks.
    chosen, reduce, warps = kernels.projection_tiles(rows, cols, k, rank, torch.device("cpu"))
    assert (chosen, -(-max(rows, cols) // chosen) * k) == (tile, programs)
    padded = 1 << (rank - 1).bit_length()
    assert chosen * padded <= kernels._PROJECTION_ACCUMULATORS
    assert reduce == kernels._PROJECTION_REDUCE and warps in (4, 8)


def apollo_errors(shapes: list[tuple[int, int]], prepared: bool, device: str, force: bool) -> dict[str, Any]:
    """An APOLLO run on bf16 weights, each weight's move against the float64 reference's, and how many
    buckets took the kernel. `force`: take it for CPU tensors too (under the interpreter)."""
    settings = ApolloSettings(lr=1e-3, rank=16, update_proj_gap=2)
    generator = torch.Generator().manual_seed(5)
    # Weights far smaller than their moves (~6e-4 a step), so that the bf16 rounding of the weight is one
    # of the move's too. The errors come out ~4e-3: that, and P in bf16 (the reference's is fp32).
    params = [
        torch.nn.Parameter((torch.randn(s, generator=generator) * 1e-4).to(device, torch.bfloat16))
        for s in shapes
    ]
    start = [p.detach().clone() for p in params]
    optimizer = Apollo(params, lr=settings.lr, rank=settings.rank, update_proj_gap=settings.update_proj_gap)
    steps = [
        [torch.randn(s, generator=generator).to(device, torch.bfloat16) for s in shapes] for _ in range(3)
    ]

    def forced(grads: list[Tensor] | Tensor, rank: int) -> bool:
        return grads[0].dtype == torch.bfloat16 and rank in kernels.PROJECTION_RANKS

    fusable = forced if force else kernels.fusable_projection
    with (
        mock.patch.object(kernels, "fusable_projection", fusable),
        mock.patch.object(kernels, "project_with_norms", wraps=kernels.project_with_norms) as fused,
    ):
        for grads in steps:
            if prepared:
                optimizer.prepare_grads(max_elements=None)
            for param, grad in zip(params, grads, strict=True):
                if prepared:
                    param.grad.add_(grad)  # type: ignore[union-attr]
                else:
                    param.grad = grad.clone()
            optimizer.step()
    errors = []
    for i, (param, begin) in enumerate(zip(params, start, strict=True)):
        seed = optimizer.state[param]["seed"]
        expected = reference_apollo(begin, [step[i] for step in steps], seed, settings)
        errors.append(relative_error(param.detach().double() - begin.double(), expected - begin.double()))
    return {"errors": errors, "fused_calls": fused.call_count}


# (weight shapes, prepared gradient buffer): a wide bucket and a tall one, as separate gradients or views.
STEP_CASES = [
    ([(48, 80), (48, 80), (80, 48), (80, 48)], False),
    ([(48, 80), (48, 80), (80, 48), (80, 48)], True),
]
STEP_CHILD = f"""
import json, sys
sys.path[:0] = [{str(ROOT / "tests" / "optim")!r}, {str(ROOT / "tests")!r}]
from test_projection_kernel import STEP_CASES, apollo_errors
for index, (shapes, prepared) in enumerate(STEP_CASES):
    print(f"RESULT|{{index}}|{{json.dumps(apollo_errors(shapes, prepared, 'cpu', force=True))}}")
"""


@pytest.fixture(scope="module")
def interpreted_steps() -> dict[int, dict[str, Any]]:
    return {int(index): json.loads(result) for index, result in interpreted_results(STEP_CHILD)}


@needs_triton
@pytest.mark.parametrize("index", range(len(STEP_CASES)), ids=["separate", "prepared"])
def test_an_apollo_step_through_the_interpreted_kernel_matches_float64(
    interpreted_steps: dict[int, dict[str, Any]], index: int
) -> None:
    result = interpreted_steps[index]
    assert result["fused_calls"] == 2 * 3  # two buckets, three steps
    assert max(result["errors"]) < BF16_MAX, result


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("prepared", [False, True], ids=["separate", "prepared"])
def test_an_apollo_step_on_cuda_takes_the_kernel_and_matches_float64(prepared: bool) -> None:
    shapes = [(1536, 1536)] * 2 + [(256, 1536)] * 2 + [(8960, 1536)] * 2 + [(1536, 8960)] * 2
    result = apollo_errors(shapes, prepared, "cuda", force=False)
    assert result["fused_calls"] == 4 * 3  # four buckets, three steps
    assert max(result["errors"]) < BF16_MAX, result


def test_cpu_gradients_keep_the_matmul_path() -> None:
    result = apollo_errors([(48, 80), (48, 80)], prepared=False, device="cpu", force=False)
    assert result["fused_calls"] == 0
    assert max(result["errors"]) < BF16_MAX, result
