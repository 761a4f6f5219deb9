"""The fused update's host side (pointer tables kept by content, keys derived on the device) and its kernel.

Real: Triton's interpreter (TRITON_INTERPRET=1, in a child process, since it is read when the kernel is
defined) runs `_update_kernel` on CPU tensors with numpy's uint32/uint64 arithmetic, against the eager path
on the same inputs. Two kinds of arithmetic: "exact" (directions exact bf16 values times 0.5, decay 1, so
`p - d * c` rounds once however it is computed: any difference is the random bits, i.e. the keys) and
"general" (random directions and coefficients, decay 0.999: the kernel must also round where the eager path
rounds, one product and then one fused multiply-add, for the bits to agree). A rounding difference shows in a
bf16 result only where it carries into the kept bits (~1 in 65,536), so "wide" repeats "general" over 1M
elements with updates as large as the weights: there, computing `p * decay - d * c` as written (two products
rounded) changed 15 weights where the eager path's fused multiply-add changed none.
"""

from __future__ import annotations

import pytest
import torch

from hogwild.optim import rounding
from hogwild.optim.rounding import apply_updates_, noise_keys
from triton_helpers import interpreted_results

CHILD = """
import itertools, torch
from hogwild.optim import rounding
from hogwild.optim.rounding import noise_keys

generator = torch.Generator().manual_seed(0)
all_seeds = [11 + 2**62, 5, 12345678901]
for arith, stacked, derive, (coef_kind, direction), shift in itertools.chain(
    itertools.product(("exact", "general"), ("stacked", "list"), ("derive", "keys"), COMBOS, (0,)),
    [("exact", "stacked", "derive", COMBOS[0], 1)],
    [("wide", "stacked", "keys", combo, 0) for combo in COMBOS],
):
    k, m, n = (1, 256, 4096) if arith == "wide" else (3, 20, 300)
    seeds = all_seeds[:k]
    keys = [noise_keys(seed, 9) for seed in seeds]
    coef_shape = {"column": (k, 1, n), "row": (k, m, 1), "tensor": (k, 1, 1), "scalar": None}[coef_kind]
    params = [torch.randn(m, n, generator=generator).to(torch.bfloat16) for _ in range(k)]
    if arith == "exact":
        directions = torch.randn(k, m, n, generator=generator).to(torch.bfloat16).to(getattr(torch, direction))
        coefs = 0.5 if coef_shape is None else torch.full(coef_shape, 0.5)
        decay = 1.0
    else:  # "wide": updates as large as the weights, so that the products' rounding matters often
        directions = torch.randn(k, m, n, generator=generator).to(getattr(torch, direction))
        scale = 1.0 if arith == "wide" else 0.1
        coefs = 0.7 * scale if coef_shape is None else torch.rand(coef_shape, generator=generator) * scale
        decay = 0.999
    eager = [p.clone() for p in params]
    rounding.apply_updates_(eager, directions, coefs, decay=decay, rounding="stochastic", keys=keys,
                            compensations=[None] * k)
    fused = [p.clone() for p in params]
    d = directions if stacked == "stacked" else list(directions.unbind(0))
    if derive == "derive":
        rounding._fused_updates_(fused, d, coefs, decay, seeds, 9 + shift)
    else:
        rounding._fused_updates_(fused, d, coefs, decay, keys, None)
    moved = not all(torch.equal(a, b) for a, b in zip(eager, params))
    same = all(torch.equal(a, b) for a, b in zip(eager, fused))
    print("RESULT|" + "|".join(map(str, (arith, stacked, derive, coef_kind, direction, shift, moved, same))))
"""
# (coefficient kind, direction dtype): one factor per column, per row, per tensor, or a scalar.
COMBOS = [("column", "bfloat16"), ("row", "float32"), ("tensor", "bfloat16"), ("scalar", "float32")]
needs_triton = pytest.mark.skipif(rounding.triton is None, reason="needs triton")


@pytest.fixture(scope="module")
def interpreted() -> dict[tuple[str, str, str, str, str, str], tuple[bool, bool]]:
    """(arithmetic, stacked, derive, coef kind, direction dtype, step shift) -> (weights moved, fused == eager)."""
    out = {}
    for arith, stacked, derive, coef_shape, direction, shift, moved, same in interpreted_results(
        f"COMBOS = {COMBOS!r}\n{CHILD}"
    ):
        out[(arith, stacked, derive, coef_shape, direction, shift)] = (moved == "True", same == "True")
    return out


@needs_triton
@pytest.mark.parametrize("arith", ["exact", "general"])
@pytest.mark.parametrize("stacked", ["stacked", "list"])
@pytest.mark.parametrize("derive", ["derive", "keys"])
@pytest.mark.parametrize(("coef_kind", "direction"), COMBOS)
def test_the_interpreted_kernel_gives_the_eager_weights_bit_for_bit(
    interpreted: dict, arith: str, stacked: str, derive: str, coef_kind: str, direction: str
) -> None:
    assert interpreted[(arith, stacked, derive, coef_kind, direction, "0")] == (True, True)


@needs_triton
@pytest.mark.parametrize(("coef_kind", "direction"), COMBOS)
def test_the_kernel_rounds_where_the_eager_path_rounds(
    interpreted: dict, coef_kind: str, direction: str
) -> None:
    """1M elements with updates as large as the weights: one product rounded, then one fused multiply-add."""
    assert interpreted[("wide", "stacked", "keys", coef_kind, direction, "0")] == (True, True)


@needs_triton
def test_keys_derived_for_another_step_give_other_weights(interpreted: dict) -> None:
    # What makes the comparison above about the keys: one step off, and the weights differ.
    coef_kind, direction = COMBOS[0]
    assert interpreted[("exact", "stacked", "derive", coef_kind, direction, "1")] == (True, False)


def test_a_table_is_made_once_per_content() -> None:
    rounding._TABLES.clear()
    cpu = torch.device("cpu")
    first = rounding._device_table((1, 2, 3, 4), cpu)
    assert rounding._device_table((1, 2, 3, 4), cpu) is first
    other = rounding._device_table((1, 2, 3, 5), cpu)
    assert other is not first and other.tolist() == [1, 2, 3, 5]
    assert first.tolist() == [1, 2, 3, 4]


def test_old_tables_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    rounding._TABLES.clear()
    monkeypatch.setattr(rounding, "_TABLES_KEPT", 3)
    cpu = torch.device("cpu")
    kept = rounding._device_table((0,), cpu)
    for value in range(1, 6):
        rounding._device_table((0,), cpu)  # used again: stays while newer ones come and go
        rounding._device_table((value,), cpu)
    assert len(rounding._TABLES) == 3
    assert rounding._device_table((0,), cpu) is kept


@pytest.mark.parametrize("steps", [[4, 4, 4], [4, 3, 4]], ids=["one-step", "steps-differ"])
def test_seeds_and_steps_give_the_noise_of_their_keys(steps: list[int]) -> None:
    generator = torch.Generator().manual_seed(2)
    params = [torch.randn(16, 40, generator=generator).to(torch.bfloat16) for _ in range(3)]
    directions = torch.randn(3, 16, 40, generator=generator)
    seeds = [7, 8, 9]
    by_keys = [p.clone() for p in params]
    apply_updates_(
        by_keys, directions, 1e-2, decay=1.0, rounding="stochastic", compensations=[None] * 3,
        keys=[noise_keys(seed, step) for seed, step in zip(seeds, steps, strict=True)],
    )  # fmt: skip
    by_seeds = [p.clone() for p in params]
    apply_updates_(
        by_seeds, directions, 1e-2, decay=1.0, rounding="stochastic", compensations=[None] * 3,
        seeds=seeds, steps=steps,
    )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(by_keys, by_seeds, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(by_keys, params, strict=True))


def test_no_noise_given_is_refused() -> None:
    param = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="keys, or seeds and steps"):
        apply_updates_([param], [param], 1.0, decay=1.0, rounding="stochastic", compensations=[None])
