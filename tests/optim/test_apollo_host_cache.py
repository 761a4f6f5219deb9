"""What the APOLLO step keeps between steps to save host time (plan buckets' caches, rounding.UpdateCache).

Real: the optimizer with its kept plan against one that plans afresh every step (`Unplanned`, whose buckets
start with empty caches), after each kind of change between steps. On CPU the eager path runs (moments and
projections kept on the plan's buckets). The CUDA path's host side is taken on CPU tensors by the bench's
harness (`apollo_host.cuda_host_only`: `is_cuda` reads True, Triton launches do nothing); there the update
kernel's arguments, its pointer table above all, are recorded and compared, since the arithmetic is not run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_apollo_plan import Change, Unplanned, drop_grad, give_grads, make_params, replace_grad, set_group

from hogwild.optim import Apollo, rounding

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import apollo_host

HYPER: dict[str, Any] = {"lr": 1e-2, "rank": 4, "update_proj_gap": 3, "weight_decay": 0.1}


def move_storage(index: int) -> Change:
    def change(optimizer: Apollo, params: list[torch.nn.Parameter]) -> None:
        params[index].data = params[index].data.clone()  # same values, another address

    change.same_values = True  # type: ignore[attr-defined]  # (only a pointer table can tell)
    return change


def reseed(optimizer: Apollo, params: list[torch.nn.Parameter]) -> None:
    """Reload the state with other seeds: the noise (and so the update kernel's table) must follow."""
    saved = optimizer.state_dict()
    for own in saved["state"].values():
        own["seed"] += 1
    optimizer.load_state_dict(saved)


CASES = [
    pytest.param(move_storage(0), id="param-storage-moved-projected"),
    pytest.param(move_storage(3), id="param-storage-moved-adamw"),
    pytest.param(replace_grad(0), id="grad-replaced"),
    pytest.param(drop_grad(1), id="grad-set-to-none"),
    pytest.param(set_group(lr=3e-2), id="lr-hot"),
    pytest.param(set_group(update_proj_gap=1), id="update-proj-gap-hot"),
    pytest.param(set_group(rank=2), id="rank"),
    pytest.param(reseed, id="seeds-reloaded"),
]


def run(
    kind: type[Apollo], prepared: bool, change: Change | None, record: list[Any] | None = None
) -> list[Any]:
    """Seven bf16 steps; `change` after the fourth's gradients. Returns the weights (or `record`)."""
    params = make_params(torch.bfloat16)
    optimizer = kind(params, **HYPER)
    for step in range(1, 8):
        give_grads(optimizer, params, step, prepared)
        if step == 4 and change is not None:
            change(optimizer, params)
        if record is not None:
            record.append(("step", step))
        optimizer.step()
    return params if record is None else record


@pytest.mark.parametrize("prepared", [False, True], ids=["autograd-grads", "prepared"])
@pytest.mark.parametrize("change", CASES)
def test_a_change_gives_the_bits_of_a_fresh_step_on_cpu(change: Change, prepared: bool) -> None:
    kept, fresh = run(Apollo, prepared, change), run(Unplanned, prepared, change)
    assert all(torch.equal(a, b) for a, b in zip(kept, fresh, strict=True))
    if getattr(change, "same_values", False):
        return
    unchanged = run(Apollo, prepared, None)
    assert not all(torch.equal(a, b) for a, b in zip(kept, unchanged, strict=True)), "the change must matter"


class _Recorder:
    """Stands in for `_update_kernel`: checks each launch's table against one built afresh from the
    arguments of the `_fused_updates_` call (addresses differ between runs, so only within a run), and
    records what must agree between runs: grid, seeds or keys, scalars, specializations."""

    def __init__(self, record: list[Any]) -> None:
        self.record = record
        self.expected: tuple[int, ...] | None = None

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(table: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            rows = table.tolist()
            if self.expected is None:  # launched without the wrapper (the table-style test): record all
                self.record.append((grid, rows, [a for a in args if not isinstance(a, torch.Tensor)]))
                return
            assert rows == list(self.expected), "a stale table"
            scalars = [a for a in args if not isinstance(a, torch.Tensor)]
            self.record.append((grid, rows[2::4], rows[3::4], scalars, sorted(kwargs.items())))

        return launch


def cuda_host_record(kind: type[Apollo], prepared: bool, change: Change | None) -> list[Any]:
    record: list[Any] = []
    recorder = _Recorder(record)
    original = rounding._fused_updates_

    def fused_updates(
        params: Any, directions: Any, coefs: Any, decay: Any, noise: Any, step: Any, **kw: Any
    ) -> None:
        stacked = isinstance(directions, torch.Tensor)
        recorder.expected = rounding._table_rows(params, None if stacked else directions, noise)
        original(params, directions, coefs, decay, noise, step, **kw)

    with apollo_host.cuda_host_only(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(rounding, "_update_kernel", recorder)
        patch.setattr(rounding, "_fused_updates_", fused_updates)
        run(kind, prepared, change, record)
    return record


@pytest.mark.skipif(rounding.triton is None, reason="the CUDA branches need triton importable")
@pytest.mark.parametrize("prepared", [False, True], ids=["autograd-grads", "prepared"])
@pytest.mark.parametrize("change", CASES)
def test_a_change_gives_the_update_launches_of_a_fresh_step_on_the_cuda_path(
    change: Change, prepared: bool
) -> None:
    kept = cuda_host_record(Apollo, prepared, change)
    assert sum(1 for entry in kept if entry[0] != "step") >= 7 * 2, "the fused update must have been taken"
    assert kept == cuda_host_record(Unplanned, prepared, change)


def test_the_update_cache_follows_the_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Table-style: each change to what the cache depends on gives what no cache gives."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True), raising=False)
    record: list[Any] = []
    monkeypatch.setattr(rounding, "_update_kernel", _Recorder(record))
    params = [torch.zeros(4, 8, dtype=torch.bfloat16) for _ in range(3)]
    directions = torch.ones(3, 4, 8)
    cache = rounding.UpdateCache()

    def both(seeds: list[int], params: list[torch.Tensor]) -> tuple[Any, Any]:
        for use in (cache, None):
            rounding.apply_updates_(
                params, directions, 0.5, decay=1.0, rounding="stochastic", compensations=[None] * 3,
                seeds=seeds, steps=[5, 5, 5], cache=use,
            )  # fmt: skip
        return record[-2], record[-1]

    seeds = [1, 2, 3]
    steps = [
        lambda: None,  # nothing changed: the kept table
        lambda: setattr(params[1], "data", params[1].clone()),  # a parameter's storage moved
        lambda: seeds.__setitem__(0, 9),  # a seed changed in place
        lambda: params.append(params.pop(0)),  # the same list, reordered
    ]
    for change in steps:
        change()
        with_cache, without = both(seeds, params)
        assert with_cache == without
    assert cache.current(params)
    params[2].data = torch.zeros(4, 8, dtype=torch.float32)  # no longer bf16 (a new address): not fusable
    assert not rounding._fusable(params, directions, 0.5, "stochastic", cache)
    assert cache.current(params) and not cache.fusable
