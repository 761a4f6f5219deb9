"""hogwild.optim.Apollo: the paper's update, small resumable state, in-place bf16 updates that do not vanish."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from hogwild.optim import Apollo, projection_matrix, state_bytes

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def reference_apollo(
    weight: Tensor,
    grads: list[Tensor],
    *,
    seed: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    rank: int,
    scale_type: str,
    update_proj_gap: int,
    scale: float,
    norm_growth_limit: float | None,
    device: str = "cpu",
) -> tuple[Tensor, int]:
    """The paper's Algorithm 1 in float64, step by step; returns the weight and how often the limiter cut."""
    w = weight.double().clone()
    m, n = w.shape
    moment_shape = (rank, n) if m <= n else (m, rank)
    exp_avg = torch.zeros(moment_shape, dtype=torch.float64)
    exp_avg_sq = torch.zeros(moment_shape, dtype=torch.float64)
    previous_norm, limited = 0.0, 0
    for t, grad in enumerate(grads, start=1):
        g = grad.double()
        refresh = (t - 1) // update_proj_gap
        if m <= n:
            r = projection_matrix(seed, refresh, (rank, m), rank, torch.device(device)).cpu().double() @ g
        else:
            r = g @ projection_matrix(seed, refresh, (n, rank), rank, torch.device(device)).cpu().double()
        exp_avg = betas[0] * exp_avg + (1 - betas[0]) * r
        exp_avg_sq = betas[1] * exp_avg_sq + (1 - betas[1]) * r * r
        r_tilde = (exp_avg / (1 - betas[0] ** t)) / ((exp_avg_sq / (1 - betas[1] ** t)).sqrt() + eps)
        if scale_type == "channel":
            dim = 0 if m <= n else 1
            s = r_tilde.norm(dim=dim, keepdim=True) / r.norm(dim=dim, keepdim=True)
        else:
            s = r_tilde.norm() / r.norm()
        g_tilde = scale * g * s
        norm = g_tilde.norm().item()
        if norm_growth_limit is not None and previous_norm > 0 and norm > norm_growth_limit * previous_norm:
            g_tilde = g_tilde * (norm_growth_limit * previous_norm / norm)
            norm = norm_growth_limit * previous_norm
            limited += 1
        previous_norm = norm
        w = w * (1 - lr * weight_decay) - lr * g_tilde
    return w, limited


def random_grads(shape: tuple[int, ...], steps: int, *, flipping: bool = False) -> list[Tensor]:
    """Independent random gradients; or, with `flipping`, one gradient whose sign flips every step.

    A flipping gradient cancels in the first moment at step 2 and recovers after, so the update norm grows
    and the norm-growth limiter has something to cut.
    """
    generator = torch.Generator().manual_seed(42)
    if flipping:
        base = torch.randn(shape, generator=generator)
        return [(-1) ** t * base + 0.1 * torch.randn(shape, generator=generator) for t in range(steps)]
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


BASE: dict[str, Any] = {
    "lr": 1e-2,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "rank": 4,
    "scale_type": "channel",
    "update_proj_gap": 200,
    "scale": 1.0,
    "norm_growth_limit": 1.01,
}


@pytest.mark.parametrize(
    ("shape", "overrides", "steps", "limiter_cuts"),
    [
        pytest.param((24, 40), {"norm_growth_limit": None}, 5, False, id="channel-wide"),
        pytest.param((40, 24), {"norm_growth_limit": None}, 5, False, id="channel-tall"),
        pytest.param((24, 40), {"scale_type": "tensor", "rank": 1, "scale": 11.3, "norm_growth_limit": None}, 5, False, id="tensor-mini"),
        pytest.param((24, 40), {}, 6, True, id="channel-with-limiter"),
        pytest.param((40, 24), {"scale_type": "tensor"}, 6, True, id="tensor-with-limiter"),
        pytest.param((24, 40), {"weight_decay": 0.1, "norm_growth_limit": None}, 5, False, id="weight-decay"),
        pytest.param((24, 40), {"update_proj_gap": 2}, 7, True, id="across-proj-gap"),
        pytest.param((40, 24), {"update_proj_gap": 3, "scale": 2.0, "weight_decay": 0.05}, 7, True, id="tall-gap-scale-decay"),
        pytest.param((24, 40), {"update_proj_gap": 2, "device": "cuda"}, 7, True, id="cuda-channel", marks=[pytest.mark.gpu, CUDA]),
        pytest.param((40, 24), {"scale_type": "tensor", "device": "cuda"}, 6, True, id="cuda-tensor-tall", marks=[pytest.mark.gpu, CUDA]),
    ],
)  # fmt: skip
def test_update_matches_float64_reference(
    shape: tuple[int, int], overrides: dict[str, Any], steps: int, limiter_cuts: bool
) -> None:
    hyper = {**BASE, **overrides}
    device = hyper.pop("device", "cpu")
    torch.manual_seed(0)
    start = torch.randn(shape) * 0.1  # small weights: fp32 storage error stays far below the tolerance
    weight = torch.nn.Parameter(start.to(device, copy=True))
    optimizer = Apollo([weight], **hyper)
    grads = random_grads(shape, steps, flipping=limiter_cuts)
    for grad in grads:
        weight.grad = grad.to(device, copy=True)
        optimizer.step()
    seed = optimizer.state[weight]["seed"]
    expected, limited = reference_apollo(start, grads, seed=seed, device=device, **hyper)
    assert (limited > 0) is limiter_cuts, "the case must exercise the limiter exactly when it says so"
    moved, expected_moved = weight.detach().cpu().double() - start.double(), expected - start.double()
    assert torch.allclose(moved, expected_moved, rtol=1e-4, atol=1e-5 * expected_moved.abs().max().item())


@pytest.mark.parametrize(
    ("make_params", "group"),
    [
        pytest.param(lambda: [torch.randn(64)], {}, id="1d-bias"),
        pytest.param(lambda: [torch.randn(6, 40)], {"rank": 8}, id="smaller-side-below-rank"),
        pytest.param(lambda: [torch.randn(24, 40)], {"low_rank": False}, id="group-opted-out"),
        pytest.param(lambda: [torch.randn(2, 3, 4)], {}, id="3d"),
    ],
)
def test_unprojected_parameters_follow_torch_adamw(
    make_params: Callable[[], list[Tensor]], group: dict
) -> None:
    torch.manual_seed(0)
    starts = make_params()
    ours = [torch.nn.Parameter(s.clone()) for s in starts]
    theirs = [torch.nn.Parameter(s.clone()) for s in starts]
    apollo = Apollo([{"params": ours, **group}], lr=1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, eps=1e-8)
    for grad in random_grads(tuple(starts[0].shape), 5):
        ours[0].grad, theirs[0].grad = grad.clone(), grad.clone()
        apollo.step()
        adamw.step()
    assert apollo.state[ours[0]]["exp_avg"].shape == starts[0].shape
    assert torch.allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param({"lr": -1e-3}, "lr", id="negative-lr"),
        pytest.param({"lr": float("nan")}, "lr", id="nan-lr"),
        pytest.param({"lr": "1e-3"}, "lr", id="string-lr"),
        pytest.param({"betas": (0.9,)}, "betas", id="one-beta"),
        pytest.param({"betas": (1.0, 0.999)}, r"betas\[0\]", id="beta1-one"),
        pytest.param({"betas": (0.9, -0.1)}, r"betas\[1\]", id="beta2-negative"),
        pytest.param({"eps": 0.0}, "eps", id="zero-eps"),
        pytest.param({"weight_decay": -0.1}, "weight_decay", id="negative-decay"),
        pytest.param({"rank": 0}, "rank", id="rank-zero"),
        pytest.param({"rank": 2.5}, "rank", id="rank-fraction"),
        pytest.param({"rank": True}, "rank", id="rank-bool"),
        pytest.param({"scale_type": "row"}, "scale_type", id="unknown-scale-type"),
        pytest.param({"update_proj_gap": 0}, "update_proj_gap", id="gap-zero"),
        pytest.param({"scale": 0.0}, "scale", id="zero-scale"),
        pytest.param({"norm_growth_limit": 0.5}, "norm_growth_limit", id="limit-below-one"),
        pytest.param({"rounding": "up"}, "rounding", id="unknown-rounding"),
        pytest.param({"seed": -1}, "seed", id="negative-seed"),
        pytest.param({"low_rank": 1}, "low_rank", id="low-rank-not-bool"),
    ],
)
def test_bad_arguments_are_rejected_by_name(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Apollo([torch.nn.Parameter(torch.zeros(4, 4))], **kwargs)


def test_bad_param_group_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="rank"):
        Apollo([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "rank": -3}])


def stepped(shape: tuple[int, int], rank: int, steps: int = 2) -> tuple[Apollo, torch.nn.Parameter]:
    weight = torch.nn.Parameter(torch.randn(shape))
    optimizer = Apollo([weight], rank=rank)
    for grad in random_grads(shape, steps):
        weight.grad = grad
        optimizer.step()
    return optimizer, weight


def test_state_dict_holds_only_tensors_and_numbers() -> None:
    optimizer, _ = stepped((32, 48), rank=4)
    state = optimizer.state_dict()["state"]
    for per_param in state.values():
        for key, value in per_param.items():
            assert isinstance(value, Tensor | int | float) and not isinstance(value, bool), key
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert torch.equal(loaded["state"][0]["exp_avg"], state[0]["exp_avg"])


@pytest.mark.parametrize(
    ("shape", "moment_shape"),
    [pytest.param((256, 512), (8, 512), id="wide"), pytest.param((512, 256), (512, 8), id="tall")],
)
def test_state_is_the_projected_moments_not_the_projection(
    shape: tuple[int, int], moment_shape: tuple[int, int]
) -> None:
    optimizer, weight = stepped(shape, rank=8)
    state = optimizer.state[weight]
    assert state["exp_avg"].shape == moment_shape and state["exp_avg_sq"].shape == moment_shape
    # Two 8 x 512 fp32 moments and the limiter's scalar: no 256-sized (projection) matrix anywhere.
    assert state_bytes(optimizer) == 2 * 8 * 512 * 4 + 4
    assert isinstance(state["seed"], int)


def resume_problem(dtype: torch.dtype, device: str) -> list[Tensor]:
    generator = torch.Generator().manual_seed(3)
    shapes = [(24, 40), (40, 24), (24, 40), (40,)]
    return [torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes]


def run_steps(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], first: int, last: int
) -> None:
    for step in range(first, last + 1):
        generator = torch.Generator().manual_seed(1000 + step)
        for param in params:
            noise = torch.randn(param.shape, generator=generator).to(device=param.device, dtype=param.dtype)
            param.grad = noise + 0.1 * param.detach()
        optimizer.step()


@pytest.mark.parametrize(
    ("dtype", "rounding", "device"),
    [
        pytest.param(torch.float32, "stochastic", "cpu", id="fp32"),
        pytest.param(torch.bfloat16, "stochastic", "cpu", id="bf16-stochastic"),
        pytest.param(torch.bfloat16, "kahan", "cpu", id="bf16-kahan"),
        pytest.param(torch.bfloat16, "stochastic", "cuda", id="cuda-bf16-stochastic", marks=[pytest.mark.gpu, CUDA]),
    ],
)  # fmt: skip
def test_resume_continues_bit_for_bit(dtype: torch.dtype, rounding: str, device: str) -> None:
    hyper = {"lr": 1e-3, "rank": 4, "update_proj_gap": 3, "rounding": rounding, "weight_decay": 0.01}
    through = [torch.nn.Parameter(w) for w in resume_problem(dtype, device)]
    run_steps(Apollo(through, **hyper), through, 1, 8)

    first = [torch.nn.Parameter(w) for w in resume_problem(dtype, device)]
    optimizer = Apollo(first, **hyper)
    run_steps(optimizer, first, 1, 4)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "weights": [p.detach() for p in first]}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True, map_location=device)

    resumed = [torch.nn.Parameter(w.clone()) for w in checkpoint["weights"]]
    optimizer = Apollo(resumed, **hyper)
    optimizer.load_state_dict(checkpoint["optimizer"])
    run_steps(optimizer, resumed, 5, 8)
    for a, b in zip(through, resumed, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)

    # Without the saved state the continuation differs: the comparison above can fail.
    restarted = [torch.nn.Parameter(w.clone()) for w in checkpoint["weights"]]
    run_steps(Apollo(restarted, **hyper), restarted, 5, 8)
    assert not all(torch.equal(a, b) for a, b in zip(through, restarted, strict=True))


@pytest.mark.parametrize(
    ("dtype", "rounding"),
    [
        pytest.param(torch.float32, "stochastic", id="fp32"),
        pytest.param(torch.bfloat16, "stochastic", id="bf16-stochastic"),
        pytest.param(torch.bfloat16, "kahan", id="bf16-kahan"),
    ],
)
def test_a_preemption_point_between_buckets_changes_nothing(dtype: torch.dtype, rounding: str) -> None:
    hyper = {"lr": 1e-3, "rank": 4, "update_proj_gap": 3, "rounding": rounding}
    plain = [torch.nn.Parameter(w) for w in resume_problem(dtype, "cpu")]
    run_steps(Apollo(plain, **hyper), plain, 1, 4)
    pointed = [torch.nn.Parameter(w) for w in resume_problem(dtype, "cpu")]
    optimizer = Apollo(pointed, **hyper)
    points: list[int] = []
    optimizer.preemption_point = lambda: points.append(1)
    run_steps(optimizer, pointed, 1, 4)
    assert all(torch.equal(a, b) for a, b in zip(plain, pointed, strict=True))
    assert len(points) == 4 * 3  # per step: the (24, 40) pair, the (40, 24) weight, the AdamW bias
    assert "preemption_point" not in str(optimizer.state_dict())  # not state: resume is unaffected


def bf16_run(rounding: str, dtype: torch.dtype, start: Tensor, steps: int) -> Tensor:
    weight = torch.nn.Parameter(start.to(dtype, copy=True))
    optimizer = Apollo([weight], lr=1e-4, rank=8, rounding=rounding)
    generator = torch.Generator().manual_seed(5)
    trend = torch.randn(start.shape, generator=generator)
    for _ in range(steps):
        # bf16-representable gradients with a steady trend, so both precisions see the same ones and move.
        grad = trend + 0.3 * torch.randn(start.shape, generator=generator)
        weight.grad = grad.to(torch.bfloat16).to(dtype)
        optimizer.step()
    return weight.detach().float()


@pytest.fixture(scope="module")
def bf16_start() -> Tensor:
    # Magnitudes in [1, 2): a bf16 ulp there is 2^-7, and lr 1e-4 steps are ~1/50 of it.
    generator = torch.Generator().manual_seed(4)
    magnitude = 1 + torch.rand(128, 256, generator=generator)
    sign = torch.randint(0, 2, (128, 256), generator=generator) * 2 - 1
    return (magnitude * sign).to(torch.bfloat16).float()


@pytest.mark.parametrize(
    ("rounding", "tracks_fp32"),
    [
        pytest.param("stochastic", True, id="stochastic-tracks-fp32"),
        pytest.param("nearest", False, id="nearest-leaves-weights-unchanged"),
    ],
)
def test_small_steps_move_bf16_weights_like_fp32(
    bf16_start: Tensor, rounding: str, tracks_fp32: bool
) -> None:
    steps = 30
    reference = bf16_run(rounding, torch.float32, bf16_start, steps) - bf16_start
    moved = bf16_run(rounding, torch.bfloat16, bf16_start, steps) - bf16_start
    assert reference.abs().mean().item() > 2e-4, "fp32 weights must move"
    # Least-squares slope of the bf16 moves on the fp32 moves: 1 when bf16 follows fp32 in expectation.
    slope = (moved * reference).sum().item() / (reference * reference).sum().item()
    if tracks_fp32:
        assert slope == pytest.approx(1.0, abs=0.05)
    else:
        assert torch.equal(moved, torch.zeros_like(moved))


@pytest.mark.parametrize(
    ("dtype", "rounding"),
    [
        pytest.param(torch.float32, "stochastic", id="fp32"),
        pytest.param(torch.bfloat16, "stochastic", id="bf16-stochastic"),
        pytest.param(torch.bfloat16, "kahan", id="bf16-kahan"),
        pytest.param(torch.bfloat16, "nearest", id="bf16-nearest"),
    ],
)
def test_updates_stay_in_the_served_storage(dtype: torch.dtype, rounding: str) -> None:
    # Like vLLM's fused qkv_proj: the module's q, k and v are views of one served tensor.
    served = torch.randn(96, 64).to(dtype)
    before = served.clone()
    views = [torch.nn.Parameter(served[i * 32 : (i + 1) * 32]) for i in range(3)]
    pointers = [v.data_ptr() for v in views]
    optimizer = Apollo(views, lr=1e-2, rank=4, rounding=rounding)
    run_steps(optimizer, views, 1, 3)
    assert [v.data_ptr() for v in views] == pointers
    assert all(v.untyped_storage().data_ptr() == served.untyped_storage().data_ptr() for v in views)
    assert not torch.equal(served, before), "the served tensor itself must change"


def test_parameters_without_gradients_are_left_alone() -> None:
    used, unused = torch.nn.Parameter(torch.randn(16, 24)), torch.nn.Parameter(torch.randn(16, 24))
    before = unused.detach().clone()
    optimizer = Apollo([used, unused], rank=4)
    used.grad = torch.randn(16, 24)
    optimizer.step()
    assert unused not in optimizer.state and torch.equal(unused, before)


def test_a_step_without_one_gradient_keeps_its_moments_apart() -> None:
    # Same-shape weights share moment buffers; one that misses a step leaves with moments of its own.
    weights = [torch.nn.Parameter(torch.randn(16, 24)) for _ in range(3)]
    optimizer = Apollo(weights, rank=4)
    run_steps(optimizer, weights, 1, 2)
    idle = weights[1]
    kept = {k: v.clone() for k, v in optimizer.state[idle].items() if isinstance(v, Tensor)}
    idle_before = idle.detach().clone()
    generator = torch.Generator().manual_seed(9)
    idle.grad = None
    for weight in (weights[0], weights[2]):
        weight.grad = torch.randn(16, 24, generator=generator)
    optimizer.step()
    assert torch.equal(idle, idle_before)
    assert all(torch.equal(optimizer.state[idle][k], v) for k, v in kept.items())
    storage = optimizer.state[idle]["exp_avg"].untyped_storage().data_ptr()
    assert storage != optimizer.state[weights[0]]["exp_avg"].untyped_storage().data_ptr()
    run_steps(optimizer, weights, 4, 5)  # and all three step together again
    assert optimizer.state[idle]["step"] == 4 and optimizer.state[weights[0]]["step"] == 5


def test_closure_loss_is_returned() -> None:
    weight = torch.nn.Parameter(torch.randn(8, 12))
    optimizer = Apollo([weight], rank=2)

    def closure() -> float:
        optimizer.zero_grad()
        loss = (weight**2).sum()
        loss.backward()
        return loss.item()

    before = (weight.detach() ** 2).sum().item()
    assert optimizer.step(closure) == before


def train_mlp(
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
) -> tuple[float, float]:
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 48))
    student = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 48))
    inputs = torch.randn(512, 64)
    with torch.no_grad():
        targets = teacher(inputs)
    optimizer = make_optimizer(list(student.parameters()))
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(student(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.parametrize(
    "make_apollo",
    [
        pytest.param(lambda ps: Apollo(ps, lr=3e-3, rank=16), id="apollo-rank16"),
        pytest.param(lambda ps: Apollo(ps, lr=3e-3, rank=1, scale_type="tensor", scale=math.sqrt(128)), id="apollo-mini"),
    ],
)  # fmt: skip
def test_apollo_trains_about_as_well_as_adamw(make_apollo: Callable[[list], torch.optim.Optimizer]) -> None:
    first, adamw_final = train_mlp(lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.0))
    _, apollo_final = train_mlp(make_apollo)
    assert adamw_final < first / 4, "the problem must be learnable"
    assert apollo_final < first / 4
    assert apollo_final < 2 * adamw_final
