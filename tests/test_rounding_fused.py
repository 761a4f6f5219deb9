"""The fused update's host side (pointer tables kept by content, keys derived on the device) and its kernel.

Real: Triton's interpreter (TRITON_INTERPRET=1, in a child process, since it is read when the kernel is
defined) runs `_update_kernel` on CPU tensors with numpy's uint32/uint64 arithmetic, against the eager path
on the same inputs. Directions are exact bf16 values times 0.5 and decay 1, so `p - d * c` rounds once
whether or not it is contracted to a fused multiply-add: then the results agree bit for bit, and every
difference would be the random bits, i.e. the keys.
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

k, m, n = 3, 20, 300
generator = torch.Generator().manual_seed(0)
seeds = [11 + 2**62, 5, 12345678901]
keys = [noise_keys(seed, 9) for seed in seeds]
for stacked, derive, (coef_shape, direction), shift in itertools.chain(
    itertools.product(("stacked", "list"), ("derive", "keys"), COMBOS, (0,)),
    [("stacked", "derive", COMBOS[0], 1)],
):
    params = [torch.randn(m, n, generator=generator).to(torch.bfloat16) for _ in range(k)]
    directions = torch.randn(k, m, n, generator=generator).to(torch.bfloat16).to(getattr(torch, direction))
    coefs = 0.5 if coef_shape is None else torch.full(coef_shape, 0.5)
    eager = [p.clone() for p in params]
    rounding.apply_updates_(eager, directions, coefs, decay=1.0, rounding="stochastic", keys=keys,
                            compensations=[None] * k)
    fused = [p.clone() for p in params]
    d = directions if stacked == "stacked" else list(directions.unbind(0))
    if derive == "derive":
        rounding._fused_updates_(fused, d, coefs, 1.0, seeds, 9 + shift)
    else:
        rounding._fused_updates_(fused, d, coefs, 1.0, keys, None)
    moved = not all(torch.equal(a, b) for a, b in zip(eager, params))
    same = all(torch.equal(a, b) for a, b in zip(eager, fused))
    print("RESULT|" + "|".join(map(str, (stacked, derive, coef_shape, direction, shift, moved, same))))
"""
COMBOS = [((3, 1, 300), "bfloat16"), ((3, 20, 1), "float32"), ((3, 1, 1), "bfloat16"), (None, "float32")]
needs_triton = pytest.mark.skipif(rounding.triton is None, reason="needs triton")


@pytest.fixture(scope="module")
def interpreted() -> dict[tuple[str, str, str, str, str], tuple[bool, bool]]:
    """(stacked, derive, coef shape, direction dtype, step shift) -> (weights moved, fused == eager)."""
    out = {}
    for stacked, derive, coef_shape, direction, shift, moved, same in interpreted_results(
        f"COMBOS = {COMBOS!r}\n{CHILD}"
    ):
        out[(stacked, derive, coef_shape, direction, shift)] = (moved == "True", same == "True")
    return out


@needs_triton
@pytest.mark.parametrize("stacked", ["stacked", "list"])
@pytest.mark.parametrize("derive", ["derive", "keys"])
@pytest.mark.parametrize(("coef_shape", "direction"), COMBOS)
def test_the_interpreted_kernel_gives_the_eager_weights_bit_for_bit(
    interpreted: dict, stacked: str, derive: str, coef_shape: tuple[int, ...] | None, direction: str
) -> None:
    assert interpreted[(stacked, derive, str(coef_shape), direction, "0")] == (True, True)


@needs_triton
def test_keys_derived_for_another_step_give_other_weights(interpreted: dict) -> None:
    # What makes the comparison above about the keys: one step off, and the weights differ.
    coef_shape, direction = COMBOS[0]
    assert interpreted[("stacked", "derive", str(coef_shape), direction, "1")] == (True, False)


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
