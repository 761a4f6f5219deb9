"""Apollo.prepare_grads: a bucket's gradients in one buffer, so the step batches, with the same weights.

Real: torch autograd accumulating into the prepared views, the optimizer's batched path (one bmm and one
norm per bucket) against its per-parameter path on the same gradients, torch.save/torch.load for resume.
CPU fp32 and bf16: on CPU the two paths agree bit for bit.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from hogwild.optim import Apollo

# Three wide weights (one bucket), two tall ones (another), and a bias (AdamW).
SHAPES = [(24, 40), (24, 40), (24, 40), (40, 24), (40, 24), (40,)]
HYPER: dict[str, Any] = {"lr": 1e-2, "rank": 4, "update_proj_gap": 2, "weight_decay": 0.1}


def make_params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in SHAPES]


def step_grads(step: int, params: list[torch.nn.Parameter], flipping: bool) -> list[Tensor]:
    """Step `step`'s gradients; with `flipping`, signs alternate so that the norm-growth limiter cuts."""
    generator = torch.Generator().manual_seed(100 + (0 if flipping else step))
    base = [torch.randn(p.shape, generator=generator) for p in params]
    noise = torch.Generator().manual_seed(200 + step)
    sign = (-1) ** step if flipping else 1
    return [
        (sign * b + 0.1 * torch.randn(b.shape, generator=noise)).to(p.dtype)
        for b, p in zip(base, params, strict=True)
    ]


def give_grads(
    optimizer: Apollo, params: list[torch.nn.Parameter], grads: list[Tensor], prepared: bool
) -> None:
    """As a backward would: into the prepared buffers (autograd adds into them), or as fresh tensors."""
    if prepared:
        optimizer.prepare_grads(max_elements=None)
        for param, grad in zip(params, grads, strict=True):
            if param.grad is None:
                param.grad = grad.clone()
            else:
                param.grad.add_(grad)
    else:
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()


@pytest.fixture
def bmm_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts torch.bmm calls: the batched path makes one per projected bucket, the per-parameter path none."""
    calls: list[int] = []
    original = torch.bmm

    def counted(*args: Any, **kwargs: Any) -> Tensor:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", counted)
    yield calls


def run(prepared: bool, steps: int, dtype: torch.dtype, flipping: bool, **hyper: Any) -> tuple[list, Apollo]:
    params = make_params(dtype)
    optimizer = Apollo(params, **{**HYPER, **hyper})
    for step in range(1, steps + 1):
        give_grads(optimizer, params, step_grads(step, params, flipping), prepared)
        optimizer.step()
    return params, optimizer


def state_tensors(optimizer: Apollo) -> list[Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]


@pytest.mark.parametrize(
    ("dtype", "hyper", "flipping"),
    [
        pytest.param(torch.float32, {}, False, id="channel"),
        pytest.param(torch.float32, {}, True, id="channel-limiter"),
        pytest.param(torch.float32, {"scale_type": "tensor"}, True, id="tensor-limiter"),
        pytest.param(torch.float32, {"norm_growth_limit": None, "weight_decay": 0.0}, False, id="no-limit-no-decay"),
        pytest.param(torch.bfloat16, {"rounding": "stochastic"}, True, id="bf16-stochastic"),
        pytest.param(torch.bfloat16, {"rounding": "kahan"}, True, id="bf16-kahan"),
    ],
)  # fmt: skip
def test_the_batched_step_gives_the_per_parameter_weights_bit_for_bit(
    bmm_calls: list[int], dtype: torch.dtype, hyper: dict[str, Any], flipping: bool
) -> None:
    steps = 7  # projections refresh at steps 3, 5, 7 (update_proj_gap 2)
    plain, plain_optimizer = run(False, steps, dtype, flipping, **hyper)
    assert not bmm_calls
    batched, batched_optimizer = run(True, steps, dtype, flipping, **hyper)
    assert len(bmm_calls) == 2 * steps, "one bmm per projected bucket (wide and tall) per step"
    assert all(torch.equal(a, b) for a, b in zip(plain, batched, strict=True))
    assert all(
        torch.equal(a, b)
        for a, b in zip(state_tensors(plain_optimizer), state_tensors(batched_optimizer), strict=True)
    )
    assert not all(torch.equal(a, b) for a, b in zip(plain, make_params(dtype), strict=True)), "must move"


@pytest.mark.parametrize("flipping", [False, True], ids=["steady", "limiter"])
def test_apollo_mini_batched_step_agrees_to_float32_rounding(flipping: bool) -> None:
    # A tall weight's rank-1 projection G @ p is a matrix-vector product: torch.mm takes a gemv kernel
    # there, bmm a batched matrix product, which sum in another order. Everything after that is exact.
    hyper = {"scale_type": "tensor", "rank": 1, "scale": 11.3}
    start = make_params()
    plain, _ = run(False, 7, torch.float32, flipping, **hyper)
    batched, _ = run(True, 7, torch.float32, flipping, **hyper)
    for a, b, s in zip(plain, batched, start, strict=True):
        moved = (a - s).norm()
        assert moved > 0 and (a - b).norm() <= 1e-5 * moved


def test_the_limiter_cuts_in_the_flipping_cases() -> None:
    # What makes the "-limiter" cases above cover the limiter: without it the weights end elsewhere.
    limited, _ = run(True, 6, torch.float32, True)
    free, _ = run(True, 6, torch.float32, True, norm_growth_limit=None)
    assert not torch.equal(limited[0], free[0])


@pytest.mark.parametrize(
    "replace",
    [
        pytest.param(lambda p: setattr(p, "grad", p.grad.clone()), id="replaced-gradient"),
        pytest.param(lambda p: setattr(p, "grad", None), id="no-gradient"),
    ],
)
def test_gradients_that_left_the_buffer_take_the_per_parameter_path(
    bmm_calls: list[int], replace: Callable[[torch.nn.Parameter], None]
) -> None:
    plain = make_params()
    plain_optimizer = Apollo(plain, **HYPER)
    params = make_params()
    optimizer = Apollo(params, **HYPER)
    grads = step_grads(1, params, False)
    give_grads(plain_optimizer, plain, grads, prepared=False)
    give_grads(optimizer, params, grads, prepared=True)
    replace(params[1])  # a member of the wide bucket
    if params[1].grad is None:
        plain[1].grad = None
    plain_optimizer.step()
    optimizer.step()
    assert len(bmm_calls) == 1, "only the tall bucket is still one buffer"
    assert all(torch.equal(a, b) for a, b in zip(plain, params, strict=True))


# Rank 32 and a steady gradient: after it stops, |R~| ~ 0.9 per entry, so ||R~|| over a channel is ~5, and
# ||R~|| / tiny (1.2e-38) would overflow to inf; the gradient part 0 * inf of the update would be NaN.
ZERO_HYPER: dict[str, Any] = {**HYPER, "rank": 32, "update_proj_gap": 200}


@pytest.mark.parametrize(
    ("shape", "hyper"),
    [
        pytest.param((64, 96), {}, id="channel-wide"),
        pytest.param((96, 64), {}, id="channel-tall"),
        pytest.param((64, 96), {"scale_type": "tensor"}, id="tensor"),
        pytest.param((64, 96), {"norm_growth_limit": None}, id="channel-no-limit"),
    ],
)
def test_a_weight_without_gradient_gets_only_weight_decay(
    shape: tuple[int, int], hyper: dict[str, Any]
) -> None:
    generator = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for _ in range(3)]
    optimizer = Apollo(params, **{**ZERO_HYPER, **hyper})
    grads = [torch.randn(shape, generator=generator) for _ in params]
    for _ in range(3):
        give_grads(optimizer, params, grads, prepared=True)
        optimizer.step()
    idle = params[1]
    before = idle.detach().clone()
    grads[1] = torch.zeros(shape)  # what an unused weight has after the backward
    give_grads(optimizer, params, grads, prepared=True)
    optimizer.step()
    decay = 1.0 - ZERO_HYPER["lr"] * ZERO_HYPER["weight_decay"]
    assert torch.equal(idle.detach(), before * decay), "weight decay only, no gradient part"
    assert optimizer.state[idle]["step"] == 4
    assert all(bool(torch.isfinite(t).all()) for t in state_tensors(optimizer))
    assert all(bool(torch.isfinite(p).all()) for p in params)


@pytest.mark.parametrize(
    ("shape", "index"),
    [pytest.param((64, 96), (slice(None), 7), id="wide-column"), pytest.param((96, 64), (7,), id="tall-row")],
)
def test_a_channel_without_gradient_is_not_moved(shape: tuple[int, int], index: tuple[Any, ...]) -> None:
    weight = torch.nn.Parameter(torch.randn(shape))
    optimizer = Apollo([weight], **{**ZERO_HYPER, "weight_decay": 0.0})
    grad = torch.randn(shape)
    for _ in range(3):
        weight.grad = grad.clone()
        optimizer.step()
    before = weight.detach().clone()
    grad[index] = 0  # e.g. an input feature that was 0 in every sample
    weight.grad = grad.clone()
    optimizer.step()
    assert torch.equal(weight[index], before[index])
    assert bool(torch.isfinite(weight).all()) and not torch.equal(weight, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autograd_accumulates_micro_batches_into_the_prepared_buffer(
    bmm_calls: list[int], dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(40, 24, bias=False).to(dtype) for _ in range(3)]
    plain = [torch.nn.Linear(40, 24, bias=False).to(dtype) for _ in range(3)]
    for a, b in zip(plain, layers, strict=True):
        a.load_state_dict(b.state_dict())
    optimizer = Apollo([layer.weight for layer in layers], **HYPER)
    optimizer.prepare_grads()
    views = [layer.weight.grad for layer in layers]
    pointers = [v.data_ptr() for v in views]  # type: ignore[union-attr]
    size = 24 * 40 * views[0].element_size()  # type: ignore[union-attr]
    assert [b - a for a, b in itertools.pairwise(pointers)] == [size, size], "one contiguous buffer"
    micro_batches = [torch.randn(5, 40).to(dtype) for _ in range(3)]
    for x in micro_batches:
        sum(layer(x).square().sum() for layer in layers).backward()  # type: ignore[union-attr]
        sum(layer(x).square().sum() for layer in plain).backward()  # type: ignore[union-attr]
    for layer, view, a in zip(layers, views, plain, strict=True):
        assert layer.weight.grad is view, "autograd must add into the view, not replace it"
        assert torch.equal(layer.weight.grad, a.weight.grad)
    optimizer.step()
    assert len(bmm_calls) == 1


def test_prepare_grads_zeroes_the_same_buffers_and_frees_the_other_gradients() -> None:
    params = make_params()
    params[4].requires_grad_(False)  # a frozen weight gets no buffer
    optimizer = Apollo(params, **HYPER)
    give_grads(optimizer, params, step_grads(1, params, False), prepared=True)
    optimizer.step()
    pointers = [p.grad.data_ptr() for p in params[:4]]  # type: ignore[union-attr]
    optimizer.prepare_grads()
    assert [p.grad.data_ptr() for p in params[:4]] == pointers  # type: ignore[union-attr]
    assert all(not p.grad.any() for p in params[:4])  # type: ignore[union-attr]
    assert params[4].grad is None and params[5].grad is None


@pytest.mark.parametrize(
    ("change", "buffered", "bmm_per_step"),
    [
        pytest.param(lambda opt, ps: opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(24, 40))]}), 6, 3, id="group-added"),
        pytest.param(lambda opt, ps: ps[0].requires_grad_(False), 4, 2, id="weight-frozen"),
        pytest.param(lambda opt, ps: opt.param_groups[0].update(rank=30), 0, 0, id="rank-above-every-side"),
    ],
)  # fmt: skip
def test_prepare_grads_follows_a_change_of_the_buckets(
    bmm_calls: list[int], change: Callable[[Apollo, list], object], buffered: int, bmm_per_step: int
) -> None:
    params = make_params()
    optimizer = Apollo(params, **HYPER)
    give_grads(optimizer, params, step_grads(1, params, False), prepared=True)
    optimizer.step()
    change(optimizer, params)
    optimizer.prepare_grads()
    everything = [p for g in optimizer.param_groups for p in g["params"]]
    with_grads = [p for p in everything if p.grad is not None]
    assert len(with_grads) == buffered
    for param in everything:
        if param.requires_grad:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad.normal_()
    bmm_calls.clear()
    optimizer.step()
    assert len(bmm_calls) == bmm_per_step


@pytest.mark.parametrize(
    ("max_elements", "buffered", "bmm_per_step"),
    [
        pytest.param(None, 5, 2, id="no-limit"),
        pytest.param(24 * 40, 5, 2, id="limit-at-the-size"),
        pytest.param(24 * 40 - 1, 0, 0, id="limit-below-the-size"),
    ],
)
def test_weights_above_max_elements_keep_autograds_own_gradients(
    bmm_calls: list[int], max_elements: int | None, buffered: int, bmm_per_step: int
) -> None:
    params = make_params()
    optimizer = Apollo(params, **HYPER)
    optimizer.prepare_grads(max_elements=max_elements)
    assert sum(p.grad is not None for p in params) == buffered
    plain = make_params()
    plain_optimizer = Apollo(plain, **HYPER)
    for step in range(1, 4):
        grads = step_grads(step, params, False)
        optimizer.prepare_grads(max_elements=max_elements)
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone() if param.grad is None else param.grad.add_(grad)
        give_grads(plain_optimizer, plain, grads, prepared=False)
        optimizer.step()
        plain_optimizer.step()
    assert len(bmm_calls) == 3 * bmm_per_step
    assert all(torch.equal(a, b) for a, b in zip(plain, params, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("dtype", "hyper", "tolerance"),
    [
        pytest.param(torch.bfloat16, {}, 1e-2, id="bf16-channel"),
        pytest.param(torch.bfloat16, {"scale_type": "tensor"}, 1e-2, id="bf16-tensor"),
        pytest.param(torch.float32, {}, 1e-5, id="fp32-channel"),
    ],
)
def test_on_cuda_the_batched_step_agrees_with_the_per_parameter_one(
    dtype: torch.dtype, hyper: dict[str, Any], tolerance: float
) -> None:
    # cuBLAS's bmm and mm may sum in another order: fp32 weights then differ in their last bits, and a bf16
    # weight's stochastic rounding can flip now and then (one bf16 ulp, ~the size of these moves). On an
    # H100 (torch 2.11) the bf16 weights came out bit-identical, fp32 ones 4e-6 apart relative to the move.
    shapes = [(1536, 1536)] * 3 + [(256, 1536)] * 2 + [(8960, 1536)] * 2 + [(1536, 8960)] * 2

    def run_cuda(prepared: bool) -> tuple[list[torch.nn.Parameter], list[Tensor]]:
        generator = torch.Generator(device="cuda").manual_seed(3)
        params = [
            torch.nn.Parameter(torch.randn(s, generator=generator, device="cuda").to(dtype)) for s in shapes
        ]
        start = [p.detach().clone() for p in params]
        optimizer = Apollo(params, **{**HYPER, "lr": 1e-3, "rank": 64, **hyper})
        for step in range(5):
            noise = torch.Generator(device="cuda").manual_seed(100 + step)
            grads = [torch.randn(p.shape, generator=noise, device="cuda").to(dtype) for p in params]
            give_grads(optimizer, params, grads, prepared)
            optimizer.step()
        return params, start

    plain, start = run_cuda(False)
    batched, _ = run_cuda(True)
    for a, b, s in zip(plain, batched, start, strict=True):
        moved = (a.float() - s.float()).norm()
        assert moved > 0 and (a.float() - b.float()).norm() <= tolerance * moved


def test_resume_with_prepared_grads_continues_bit_for_bit() -> None:
    hyper = {**HYPER, "lr": 1e-3, "update_proj_gap": 3}
    through = make_params(torch.bfloat16)
    through_optimizer = Apollo(through, **hyper)
    for step in range(1, 9):
        give_grads(through_optimizer, through, step_grads(step, through, False), prepared=True)
        through_optimizer.step()

    params = make_params(torch.bfloat16)
    optimizer = Apollo(params, **hyper)
    for step in range(1, 5):
        give_grads(optimizer, params, step_grads(step, params, False), prepared=True)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "weights": [p.detach() for p in params]}, buffer)
    for step in range(5, 7):  # go on, then come back: the cached buckets and projections must not leak in
        give_grads(optimizer, params, step_grads(step, params, False), prepared=True)
        optimizer.step()
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    with torch.no_grad():
        for param, saved in zip(params, checkpoint["weights"], strict=True):
            param.copy_(saved)
    optimizer.load_state_dict(checkpoint["optimizer"])
    for step in range(5, 9):
        give_grads(optimizer, params, step_grads(step, params, False), prepared=True)
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(through, params, strict=True))


@pytest.mark.parametrize(
    ("shapes", "element_budget", "expected_sizes"),
    [
        ([(4, 4)] * 28, 1 << 28, [28]),  # small weights: one bucket up to CHUNK
        ([(4, 4)] * 70, 1 << 28, [24, 24, 22]),  # over CHUNK: near-equal, not 32 + 32 + 6
        ([(16, 16)] * 28, 256 * 14, [14, 14]),  # the element budget: 14 + 14
        ([(16, 16)] * 3, 100, [1, 1, 1]),  # a weight over the budget still gets a bucket of its own
        ([(4, 4), (2, 8), (4, 4), (2, 8)], 1 << 28, [2, 2]),  # by shape, in order of first appearance
    ],
)
def test_bucket_sizes(
    monkeypatch: pytest.MonkeyPatch,
    shapes: list[tuple[int, int]],
    element_budget: int,
    expected_sizes: list[int],
) -> None:
    """Buckets are the worker's preemptible pieces: bounded in parameters and in elements, and balanced."""
    from hogwild.optim import buckets

    monkeypatch.setattr(buckets, "BUCKET_ELEMENTS", element_budget)
    params = [torch.zeros(shape) for shape in shapes]
    groups = buckets.same_shape_groups(params, grads=False)
    assert [len(group) for group in groups] == expected_sizes
    assert sorted(id(p) for group in groups for p in group) == sorted(id(p) for p in params)
    assert all(len({tuple(p.shape) for p in group}) == 1 for group in groups)
