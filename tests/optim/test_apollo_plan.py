"""Apollo's step plan (hogwild.optim.plan): reused between steps, yet every change between them takes effect.

Real: the optimizer with its cached plan against the same optimizer made to plan afresh every step (the
path the cache replaces), on CPU fp32 and bf16, with torch autograd-free gradients set as a backward would.
Each case also checks that its change mattered, so that "identical" cannot pass by the change doing nothing.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from hogwild.optim import Apollo
from hogwild.optim import plan as plan_module

# Two wide weights (a bucket), a tall one, a bias and a norm (AdamW, one bucket).
SHAPES = [(12, 20), (12, 20), (20, 12), (20,), (20,)]
HYPER: dict[str, Any] = {"lr": 1e-2, "rank": 4, "update_proj_gap": 2, "weight_decay": 0.1}
Change = Callable[[Apollo, list[torch.nn.Parameter]], object]


class Unplanned(Apollo):
    """Plans every step anew: what the step did before plans were kept."""

    def _plan(self, position: int, group: dict[str, Any], start: int) -> plan_module.GroupPlan:
        self._plans.clear()
        return super()._plan(position, group, start)


def make_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in SHAPES]


def give_grads(optimizer: Apollo, params: list[torch.nn.Parameter], step: int, prepared: bool) -> None:
    generator = torch.Generator().manual_seed(50 + step)
    if prepared:
        optimizer.prepare_grads(max_elements=None)
    for param in params:
        grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)


def save(optimizer: Apollo) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def run(
    kind: type[Apollo], dtype: torch.dtype, prepared: bool, change: Change | None, **hyper: Any
) -> list[torch.nn.Parameter]:
    """Six steps; `change` runs after the third (gradients already given for the fourth)."""
    params = make_params(dtype)
    optimizer = kind(params, **{**HYPER, **hyper})
    optimizer.load_state_dict(optimizer.state_dict())  # as a resumed worker does: no state yet
    saved = None
    for step in range(1, 7):
        give_grads(optimizer, params, step, prepared)
        if step == 2:
            saved = save(optimizer)
        if step == 4 and change is not None:
            change(optimizer, params)
            if change is load_second_state:
                assert saved is not None
                optimizer.load_state_dict(saved)
        optimizer.step()
    return params


def load_second_state(optimizer: Apollo, params: list[torch.nn.Parameter]) -> None:
    """Marker: `run` loads the state saved at step 2 (moments one step behind, steps counting from 2)."""


def set_group(**values: Any) -> Change:
    return lambda optimizer, params: optimizer.param_groups[0].update(values)


def replace_grad(index: int) -> Change:
    def change(optimizer: Apollo, params: list[torch.nn.Parameter]) -> None:
        params[index].grad = params[index].grad.mul(3)  # type: ignore[union-attr]

    return change


def drop_grad(index: int) -> Change:
    return lambda optimizer, params: setattr(params[index], "grad", None)


def grad_dtype(index: int) -> Change:
    def change(optimizer: Apollo, params: list[torch.nn.Parameter]) -> None:
        params[index].grad = params[index].grad.double().mul(2).to(params[index].dtype)  # type: ignore[union-attr]

    return change


def move_param(optimizer: Apollo, params: list[torch.nn.Parameter]) -> None:
    """A wide weight leaves its bucket for a group of its own with another lr (its state stays)."""
    group = optimizer.param_groups[0]
    group["params"] = [p for p in group["params"] if p is not params[1]]
    optimizer.add_param_group({"params": [params[1]], "lr": 3e-2})


ROUNDING = set_group(rounding="nearest")  # changes nothing in fp32 weights: they are updated exactly
CASES = [
    pytest.param(set_group(lr=3e-2), id="lr"),
    pytest.param(set_group(betas=(0.5, 0.9)), id="betas"),
    pytest.param(set_group(weight_decay=0.5), id="weight-decay"),
    pytest.param(set_group(eps=1e-1), id="eps"),
    pytest.param(set_group(scale=2.0), id="scale"),
    pytest.param(set_group(scale_type="tensor"), id="scale-type"),
    pytest.param(set_group(norm_growth_limit=1.0001), id="norm-growth-limit"),
    pytest.param(set_group(update_proj_gap=1), id="update-proj-gap"),
    pytest.param(set_group(rank=2), id="rank"),
    pytest.param(set_group(low_rank=False), id="low-rank-off"),
    pytest.param(ROUNDING, id="rounding"),
    pytest.param(load_second_state, id="load-state-dict"),
    pytest.param(replace_grad(0), id="gradient-replaced-projected"),
    pytest.param(replace_grad(3), id="gradient-replaced-adamw"),
    pytest.param(drop_grad(1), id="gradient-dropped"),
    pytest.param(grad_dtype(2), id="gradient-new-tensor-same-dtype"),
    pytest.param(move_param, id="param-moved-to-a-new-group"),
]


# Every change in both dtypes, except rounding on fp32 weights: rounding does not apply to them.
CHANGE_DTYPES = [
    pytest.param(case.values[0], dtype, id=f"{case.id}-{name}")
    for case in CASES
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    if not (case.values[0] is ROUNDING and dtype == torch.float32)
]


@pytest.mark.parametrize("prepared", [False, True], ids=["autograd-grads", "prepared"])
@pytest.mark.parametrize(("change", "dtype"), CHANGE_DTYPES)
def test_a_change_between_steps_gives_what_a_fresh_plan_gives(
    change: Change, dtype: torch.dtype, prepared: bool
) -> None:
    planned = run(Apollo, dtype, prepared, change)
    unplanned = run(Unplanned, dtype, prepared, change)
    assert all(torch.equal(a, b) for a, b in zip(planned, unplanned, strict=True))
    unchanged = run(Apollo, dtype, prepared, None)
    assert not all(torch.equal(a, b) for a, b in zip(planned, unchanged, strict=True)), (
        "the change must matter"
    )


def test_the_plan_is_reused_while_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[int] = []
    original = plan_module.build

    def counted(*args: Any, **kwargs: Any) -> plan_module.GroupPlan:
        builds.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(plan_module, "build", counted)
    params = make_params(torch.float32)
    optimizer = Apollo(params, **HYPER)
    for step in range(1, 5):
        give_grads(optimizer, params, step, prepared=True)
        optimizer.step()
    assert len(builds) == 1
    optimizer.param_groups[0]["lr"] = 0.5  # read every step: no new plan
    give_grads(optimizer, params, 5, prepared=True)
    optimizer.step()
    assert len(builds) == 1
    optimizer.load_state_dict(optimizer.state_dict())
    give_grads(optimizer, params, 6, prepared=True)
    optimizer.step()
    assert len(builds) == 2


def test_a_sparse_gradient_is_still_refused_after_the_plan_is_kept() -> None:
    params = make_params(torch.float32)
    optimizer = Apollo(params, **HYPER)
    give_grads(optimizer, params, 1, prepared=False)
    optimizer.step()
    params[3].grad = torch.zeros(20).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


def test_release_grads_keeps_only_the_buffers() -> None:
    params = make_params(torch.float32)
    optimizer = Apollo(params, **HYPER)
    give_grads(optimizer, params, 1, prepared=True)
    optimizer.step()
    optimizer.release_grads()
    kept: list[Tensor | None] = [p.grad for p in params]
    assert [g is not None for g in kept] == [True, True, True, False, False]
