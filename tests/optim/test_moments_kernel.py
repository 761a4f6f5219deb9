"""The fused moments-and-ratio kernel of an APOLLO bucket (optim/moments_kernel.py).

Real: Triton's interpreter (TRITON_INTERPRET=1, in a child process, since it is read when the kernel is
defined) runs `_moments_kernel` on CPU fp32 tensors for several consecutive steps of each case; the GPU test
runs the same cases on CUDA. Each step's moments, channel ratios and update norms are compared with a
float64 evaluation of the same formulas, with the eager `adam_normalized` + `_norm_ratio` path, and with a
second launch from the same state. `scaling_factors` is checked through the kernel against its eager self,
and on CPU (no kernel) for the same bits as before.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from hogwild.optim import buckets, moments_kernel, rounding
from triton_helpers import interpreted_results

# fp32 rounds each operation to 2^-24 (6e-8). An element takes ~10 roundings (lerp, the second moment, the
# bias corrections, sqrt, eps, two divisions) and its channel's norms sum up to 130 squares, compounded over
# 3 steps of moments: some hundred units at worst, ~1e-5 (the interpreter shows ~3e-7). A wrong formula (a
# bias correction, eps's place, a lost rank block) shows at 1e-3 or more: the cases with eps as large as
# sqrt(V^), members at different steps and ranks over one load are there for that.
TOLERANCE = 1e-5

# (k, rank, channels, dim, first step of each member, consecutive steps, size of R, eps, betas, norms of G)
# dim 1: R is (k, rank, channels) (a wide weight); dim 2: (k, channels, rank) (a tall one). Members at
# step 1 start from zero moments, the others from earlier ones; from the second step on, one channel of
# the last member gets an R of exactly 0 while its moments still hold the earlier steps.
CASES: list[tuple[Any, ...]] = [
    (1, 64, 100, 1, (1,), 3, 1.0, 1e-8, (0.9, 0.999), True),  # 100 = 3 x 32 + 4 channels
    (3, 64, 70, 1, (1, 4, 30), 3, 1.0, 1e-8, (0.9, 0.999), True),  # three bias corrections in a launch
    (2, 48, 45, 1, (2, 7), 2, 1e-3, 1e-3, (0.9, 0.999), True),  # rank padded to 64; eps as large as sqrt(V^)
    (1, 64, 90, 2, (1,), 3, 1.0, 1e-8, (0.9, 0.999), True),  # tall
    (3, 48, 37, 2, (5, 1, 12), 3, 1.0, 1e-8, (0.3, 0.99), True),  # tall, padded; lerp weight above 0.5
    (2, 96, 33, 2, (1, 1), 2, 1.0, 1e-8, (0.9, 0.999), True),  # two rank loads, the second half masked
    (2, 130, 20, 1, (3, 3), 2, 10.0, 1e-8, (0.9, 0.999), False),  # three rank loads; no update norm
    (4, 8, 300, 1, (2, 2, 2, 9), 2, 1.0, 1e-8, (0.9, 0.999), True),  # 256 channels a program: 256 + 44
]
SCALE = 2.0


def ratio_dims(case: tuple[Any, ...]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(shape of R, shape of the ratio) of a case."""
    k, rank, channels, dim = case[:4]
    if dim == 1:
        return (k, rank, channels), (k, 1, channels)
    return (k, channels, rank), (k, channels, 1)


def exact_step(
    r: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    steps: list[int],
    case: tuple[Any, ...],
    channel_norms: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The step's formulas in float64: (exp_avg, exp_avg_sq, ratio, scale * ||ratio * channel norms||)."""
    dim, eps, (beta1, beta2) = case[3], case[7], case[8]
    exp_avg = exp_avg + (1 - beta1) * (r - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * r * r
    per_member = (-1, 1, 1)
    bias1 = torch.tensor([1 - beta1**t for t in steps], dtype=torch.float64).view(per_member)
    bias2 = torch.tensor([1 - beta2**t for t in steps], dtype=torch.float64).view(per_member)
    r_tilde = (exp_avg / bias1) / ((exp_avg_sq / bias2).sqrt() + eps)
    norm_r = torch.linalg.vector_norm(r, dim=dim, keepdim=True)
    norm_r_tilde = torch.linalg.vector_norm(r_tilde, dim=dim, keepdim=True)
    ratio = torch.where(norm_r > 0, norm_r_tilde / norm_r.clamp_min(1e-300), 0.0)
    if channel_norms is None:
        return exp_avg, exp_avg_sq, ratio, None
    update_norm = SCALE * torch.linalg.vector_norm(ratio * channel_norms, dim=(1, 2))
    return exp_avg, exp_avg_sq, ratio, update_norm


def normwise(value: Tensor, exact: Tensor) -> float:
    """Largest ||value_i - exact_i|| / ||exact_i|| over the members (moments can cancel to near 0 element by
    element, so an element's own relative error says little)."""
    value, exact = value.cpu().double().reshape(len(value), -1), exact.cpu().double().reshape(len(exact), -1)
    return ((value - exact).norm(dim=1) / exact.norm(dim=1).clamp_min(1e-300)).max().item()


def elementwise(value: Tensor, exact: Tensor) -> float:
    """Largest relative error where `exact` is not 0 (ratios and norms are well conditioned); 0.0 if none."""
    value, exact = value.cpu().double(), exact.cpu().double()
    nonzero = exact != 0
    return ((value - exact).abs()[nonzero] / exact[nonzero]).max().item() if nonzero.any() else 0.0


def initial_moments(case: tuple[Any, ...], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Zero for a member at step 1, else earlier moments of R's size."""
    r_shape, size, first_steps = ratio_dims(case)[0], case[6], case[4]
    fresh = torch.tensor([t == 1 for t in first_steps]).view(-1, 1, 1)
    exp_avg = torch.where(fresh, 0.0, torch.randn(r_shape, generator=generator) * size * 0.3)
    exp_avg_sq = torch.where(fresh, 0.0, (torch.rand(r_shape, generator=generator) + 0.1) * size**2)
    return exp_avg, exp_avg_sq


def measure(case: tuple[Any, ...], device: torch.device) -> tuple[float, ...]:
    """Runs a case's steps through the kernel on `device`. Returns the worst over the steps of: relative error
    to float64 of the moments, the ratio and the update norm; the same against the eager fp32 path; and 1.0
    or 0.0 for: all finite, the ratio is 0 exactly where R's channel is, a second launch gives the same bits.
    Each path keeps its own moments from step to step."""
    k, _, channels, dim, first_steps, count, size, eps, betas, with_norms = case
    r_shape, ratio_shape = ratio_dims(case)
    generator = torch.Generator().manual_seed(channels * 31 + k)
    exp_avg, exp_avg_sq = initial_moments(case, generator)
    exact_avg, exact_avg_sq = exp_avg.double(), exp_avg_sq.double()
    eager = buckets.MomentBucket([], exp_avg.to(device), exp_avg_sq.to(device), None, [])
    exp_avg, exp_avg_sq = exp_avg.clone().to(device), exp_avg_sq.clone().to(device)
    options = {"dim": dim, "betas": betas, "eps": eps, "scale": SCALE}
    group = {"betas": betas, "eps": eps}
    worst, flags = [0.0] * 6, [True] * 3
    for step in range(count):
        steps = [t + step for t in first_steps]
        r = torch.randn(r_shape, generator=generator) * size
        if step > 0:  # a channel without gradient whose moments hold the earlier steps
            (r[-1, :, channels // 2] if dim == 1 else r[-1, channels // 2, :]).zero_()
        norms = torch.rand(ratio_shape, generator=generator) * 3 if with_norms else None
        exact_avg, exact_avg_sq, exact_ratio, exact_norm = exact_step(
            r.double(), exact_avg, exact_avg_sq, steps, case, None if norms is None else norms.double()
        )
        r, norms = r.to(device), None if norms is None else norms.to(device)
        corrections = moments_kernel.bias_corrections(steps, betas, device)
        again_avg, again_avg_sq = exp_avg.clone(), exp_avg_sq.clone()
        ratio, update_norm = moments_kernel.moments_and_ratio_(
            r, exp_avg, exp_avg_sq, corrections, channel_norms=norms, **options
        )
        ratio_again, norm_again = moments_kernel.moments_and_ratio_(
            r, again_avg, again_avg_sq, corrections, channel_norms=norms, **options
        )
        eager_ratio = buckets._norm_ratio(r, buckets.adam_normalized(eager, r, steps, group), (dim,))
        if norms is None:
            assert update_norm is None and norm_again is None and exact_norm is None
            update_norm = norm_again = eager_norm = exact_norm = torch.zeros(k)
        else:
            assert update_norm is not None and norm_again is not None
            eager_norm = torch.linalg.vector_norm(eager_ratio * norms, dim=(1, 2)).mul_(SCALE)
        errors = [
            max(normwise(exp_avg, exact_avg), normwise(exp_avg_sq, exact_avg_sq)),
            elementwise(ratio, exact_ratio),
            elementwise(update_norm, exact_norm),
            max(normwise(exp_avg, eager.exp_avg), normwise(exp_avg_sq, eager.exp_avg_sq)),
            elementwise(ratio, eager_ratio),
            elementwise(update_norm, eager_norm),
        ]
        worst = [max(w, e) for w, e in zip(worst, errors, strict=True)]
        outputs = [exp_avg, exp_avg_sq, ratio, update_norm]
        againsts = [again_avg, again_avg_sq, ratio_again, norm_again]
        flags[0] &= all(bool(t.isfinite().all()) for t in outputs)
        flags[1] &= bool((ratio.cpu() == 0).eq(exact_ratio == 0).all())
        flags[1] &= bool((exact_ratio == 0).any()) == (step > 0)  # the zero channel is there from step 2 on
        flags[2] &= all(torch.equal(a, b) for a, b in zip(outputs, againsts, strict=True))
    return (*worst, *map(float, flags))


CHILD = f"""
import sys
sys.path[:0] = [{str(Path(__file__).resolve().parent)!r}, {str(Path(__file__).resolve().parents[1])!r}]
import torch
from test_moments_kernel import CASES, measure
for index, case in enumerate(CASES):
    print("RESULT|" + "|".join(map(str, (index, *measure(case, torch.device("cpu"))))))
"""
needs_triton = pytest.mark.skipif(rounding.triton is None, reason="needs triton")


@pytest.fixture(scope="module")
def interpreted() -> dict[int, tuple[float, ...]]:
    """case index -> the fields of `measure`, with the kernel under the interpreter."""
    return {int(index): tuple(map(float, rest)) for index, *rest in interpreted_results(CHILD)}


def check(measured: tuple[float, ...]) -> None:
    moments, ratio, norm, eager_moments, eager_ratio, eager_norm, finite, zero_ok, same = measured
    assert moments < TOLERANCE and ratio < TOLERANCE and norm < TOLERANCE, measured
    assert eager_moments < TOLERANCE and eager_ratio < TOLERANCE and eager_norm < TOLERANCE, measured
    assert finite == 1.0  # no NaN or inf, the zero-R channel included
    assert zero_ok == 1.0  # 0 exactly where R is 0, and only there
    assert same == 1.0  # a second launch from the same state: the same bits


def case_id(case: tuple[Any, ...]) -> str:
    k, rank, channels, dim = case[:4]
    return f"k{k}-rank{rank}-{'wide' if dim == 1 else 'tall'}{channels}"


@needs_triton
@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(case) for case in CASES])
def test_the_interpreted_kernel_matches_float64_and_the_eager_path(
    interpreted: dict[int, tuple[float, ...]], index: int
) -> None:
    check(interpreted[index])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or rounding.triton is None, reason="needs CUDA and triton")
@pytest.mark.parametrize("case", CASES, ids=[case_id(case) for case in CASES])
def test_the_cuda_kernel_matches_float64_and_the_eager_path(case: tuple[Any, ...]) -> None:
    check(measure(case, torch.device("cuda")))


# scaling_factors with step 3 inside: (m, n, k, scale type, steps, channel norms given by the projection)
SCALING_CASES: list[tuple[Any, ...]] = [
    (24, 300, 3, "channel", (1, 1, 1), True),
    (24, 300, 2, "channel", (2, 9), False),  # the norms of G taken after the kernel, as before
    (300, 24, 2, "channel", (4, 1), True),
    (300, 24, 1, "channel", (1,), False),
    (24, 300, 2, "tensor", (3, 3), False),  # APOLLO-Mini: never the kernel
]
RANK = 8


def scaling_inputs(case: tuple[Any, ...], seed: int) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Any]]:
    m, n, k, scale_type, _, given = case
    generator = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, m, n, generator=generator)
    r = torch.randn((k, RANK, n) if m <= n else (k, m, RANK), generator=generator)
    norms = torch.linalg.vector_norm(grads, dim=1 if m <= n else 2, keepdim=True) if given else None
    group = {
        "betas": (0.9, 0.999), "eps": 1e-8, "scale": 2.0, "scale_type": scale_type,
        "norm_growth_limit": 1.01, "lr": 1e-3,
    }  # fmt: skip
    return grads, r, norms, group


def scaling_runs(case: tuple[Any, ...], fused: bool) -> list[Tensor]:
    """Two steps of `scaling_factors`: with step 3 inside (`fused`) or from `adam_normalized` as before.
    Returns each step's factors and moments, and the limiter's memory."""
    steps = list(case[4])
    out = []
    bucket = None
    for step in range(2):
        grads, r, norms, group = scaling_inputs(case, step)
        if bucket is None:
            zeros = torch.zeros_like(r)
            bucket = buckets.MomentBucket([], zeros, zeros.clone(), torch.full((r.shape[0],), 0.5), [])
        moved = [t + step for t in steps]
        if fused:
            coefs = buckets.scaling_factors(grads, r, None, bucket, group, channel_norms=norms, steps=moved)
        else:
            r_tilde = buckets.adam_normalized(bucket, r, moved, group)
            coefs = buckets.scaling_factors(grads, r, r_tilde, bucket, group, channel_norms=norms)
        assert bucket.update_norm is not None
        out += [coefs, bucket.exp_avg.clone(), bucket.exp_avg_sq.clone(), bucket.update_norm.clone()]
    return out


SCALING_CHILD = f"""
import sys
sys.path[:0] = [{str(Path(__file__).resolve().parent)!r}, {str(Path(__file__).resolve().parents[1])!r}]
from hogwild.optim import moments_kernel
from test_moments_kernel import SCALING_CASES, normwise, scaling_runs

moments_kernel.fusable = lambda *args: True  # CPU tensors through the interpreted kernel
for index, case in enumerate(SCALING_CASES):
    fused, eager = scaling_runs(case, True), scaling_runs(case, False)
    print(f"RESULT|{{index}}|{{max(normwise(a, b) for a, b in zip(fused, eager))}}")
"""


@needs_triton
def test_scaling_factors_through_the_kernel_match_the_eager_ones() -> None:
    rels = {int(index): float(rel) for index, rel in interpreted_results(SCALING_CHILD)}
    assert set(rels) == set(range(len(SCALING_CASES)))
    assert all(rel < TOLERANCE for rel in rels.values()), rels


@pytest.mark.parametrize("case", SCALING_CASES, ids=[f"{c[0]}x{c[1]}-{c[3]}-{c[5]}" for c in SCALING_CASES])
def test_on_cpu_step_3_inside_scaling_factors_gives_the_same_bits(case: tuple[Any, ...]) -> None:
    for inside, before in zip(scaling_runs(case, True), scaling_runs(case, False), strict=True):
        assert torch.equal(inside, before)


@pytest.mark.parametrize(
    ("steps", "betas"),
    [((1,), (0.9, 0.999)), ((1, 2, 50), (0.9, 0.999)), ((7, 7), (0.5, 0.95))],
)
def test_bias_corrections_are_the_doubles_rounded_once(
    steps: tuple[int, ...], betas: tuple[float, float]
) -> None:
    corrections = moments_kernel.bias_corrections(steps, betas, torch.device("cpu"))
    for row, beta in zip(corrections, betas, strict=True):
        for value, t in zip(row.tolist(), steps, strict=True):
            assert value == torch.tensor(1 - beta**t, dtype=torch.float32).item()
            assert math.isfinite(value) and value > 0
    assert moments_kernel.bias_corrections(steps, betas, torch.device("cpu")) is corrections  # cached


def test_cpu_tensors_are_not_fusable() -> None:
    r = torch.zeros(2, 8, 40)
    assert not moments_kernel.fusable(r, r.clone(), r.clone(), None, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or rounding.triton is None, reason="needs CUDA and triton")
@pytest.mark.parametrize(
    ("change", "fusable"),
    [
        ("none", True),
        ("float64", False),
        ("transposed", False),
        ("norms of the other orientation", False),
        ("norms in bf16", False),
        ("moments of another shape", False),
    ],
)
def test_which_cuda_tensors_are_fusable(change: str, fusable: bool) -> None:
    r = torch.zeros(2, 8, 40, device="cuda")
    exp_avg, exp_avg_sq, norms = r.clone(), r.clone(), torch.zeros(2, 1, 40, device="cuda")
    if change == "float64":
        r = r.double()
    elif change == "transposed":
        r = torch.zeros(2, 40, 8, device="cuda").transpose(1, 2)
    elif change == "norms of the other orientation":
        norms = torch.zeros(2, 8, 1, device="cuda")
    elif change == "norms in bf16":
        norms = norms.bfloat16()
    elif change == "moments of another shape":
        exp_avg = torch.zeros(2, 8, 41, device="cuda")
    assert moments_kernel.fusable(r, exp_avg, exp_avg_sq, norms, 1) is fusable


# The limiter kernel against the eager limiter of `scaling_factors`: (ratio shape, previous, update norms,
# limit). Channels past one load (1024) loop; previous 0 or below takes no limit, an update norm of 0 gives
# inf before the clamp, a NaN stays NaN.
LIMITER_CASES: list[tuple[Any, ...]] = [
    ((4, 1, 2500), [0.0, 2.0, 0.5, -1.0], [1.0, 1.0, 3.0, 2.0], 1.01),
    ((3, 700, 1), [1.0, 1.0, 0.0], [0.0, float("nan"), 0.0], 1.01),
    ((2, 1, 5), [1.0, 3.0], [2.0, 1.0], None),
    ((1, 1, 1), [0.25], [0.75], 2.0),
]


def eager_limiter(
    ratio: Tensor, previous: Tensor, update_norm: Tensor, limit: float | None, lr_scale: float
) -> Tensor:
    """The eager branch of `scaling_factors` from the limiter on, as written there."""
    k = ratio.shape[0]
    if limit is not None:
        factor = torch.where(previous > 0, (limit * previous / update_norm).clamp(max=1.0), 1.0)
        torch.mul(update_norm, factor, out=previous)
        ratio = ratio * factor.view(k, 1, 1)
    else:
        previous.copy_(update_norm)
    return ratio.mul_(lr_scale)


def limiter_outputs(case: tuple[Any, ...], device: torch.device, fused: bool) -> list[Tensor]:
    shape, previous, norms, limit = case
    generator = torch.Generator().manual_seed(3)
    ratio = torch.rand(shape, generator=generator).to(device)
    previous_t = torch.tensor(previous, dtype=torch.float32, device=device)
    norms_t = torch.tensor(norms, dtype=torch.float32, device=device)
    run = moments_kernel.limit_and_scale_ if fused else eager_limiter
    out = run(ratio, previous_t, norms_t, limit, 1e-3 * 2.0)
    return [out.cpu(), previous_t.cpu()]


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


LIMITER_CHILD = f"""
import sys
sys.path[:0] = [{str(Path(__file__).resolve().parent)!r}, {str(Path(__file__).resolve().parents[1])!r}]
import torch
from test_moments_kernel import LIMITER_CASES, limiter_outputs, same_bits
for index, case in enumerate(LIMITER_CASES):
    fused, eager = (limiter_outputs(case, torch.device("cpu"), f) for f in (True, False))
    print(f"RESULT|{{index}}|{{all(same_bits(a, b) for a, b in zip(fused, eager))}}")
"""


@needs_triton
def test_the_interpreted_limiter_gives_the_eager_bits() -> None:
    results = {int(index): same == "True" for index, same in interpreted_results(LIMITER_CHILD)}
    assert results == dict.fromkeys(range(len(LIMITER_CASES)), True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or rounding.triton is None, reason="needs CUDA and triton")
@pytest.mark.parametrize("case", LIMITER_CASES)
def test_the_cuda_limiter_gives_the_eager_bits(case: tuple[Any, ...]) -> None:
    fused, eager = (limiter_outputs(case, torch.device("cuda"), f) for f in (True, False))
    assert all(same_bits(a, b) for a, b in zip(fused, eager, strict=True))


@pytest.mark.parametrize(
    "change", ["none", "cpu", "fp64", "strided", "norms-shape"], ids=lambda c: f"limiter-{c}"
)
def test_which_tensors_the_limiter_kernel_takes(change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: change != "cpu"), raising=False)
    ratio, previous, norms = torch.zeros(3, 1, 8), torch.zeros(3), torch.zeros(3)
    if change == "fp64":
        previous = previous.double()
    if change == "strided":
        ratio = torch.zeros(3, 1, 16)[:, :, ::2]
    if change == "norms-shape":
        norms = torch.zeros(3, 1)
    expected = change == "none" and rounding.triton is not None
    assert moments_kernel.limiter_fusable(ratio, previous, norms) == expected
