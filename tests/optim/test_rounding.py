"""bf16 stochastic rounding and Kahan compensation: small updates must not vanish in bf16 weights."""

from __future__ import annotations

import pytest
import torch

from hogwild.optim.rounding import (
    apply_update_,
    derive_seed,
    kahan_round_,
    noise_keys,
    random_bits16,
    stochastic_round_bf16_,
)

KEYS = noise_keys(seed=1234, step=1)


def bf16_neighbours(value: float) -> tuple[float, float]:
    """The bf16 values just below and just above `value` (which must not be representable)."""
    x = torch.tensor([value])
    lower = x.to(torch.bfloat16)
    if lower.float() > x:
        lower = torch.nextafter(lower, torch.tensor([-float("inf")], dtype=torch.bfloat16))
    upper = torch.nextafter(lower, torch.tensor([float("inf")], dtype=torch.bfloat16))
    return lower.item(), upper.item()


def test_random_bits_are_16_uniform_bits() -> None:
    bits = random_bits16((256, 512), KEYS, torch.device("cpu"))
    assert bits.dtype == torch.int32
    assert int(bits.min()) >= 0 and int(bits.max()) < 65536
    # Uniform on [0, 65536): mean 32767.5, std 18918; over 131072 draws the mean's error is ~52.
    assert abs(bits.double().mean().item() - 32767.5) < 300
    # Each of the 16 bits is set about half the time.
    for bit in range(16):
        share = ((bits >> bit) & 1).double().mean().item()
        assert 0.48 < share < 0.52, f"bit {bit} set in {share:.3f} of draws"


@pytest.mark.parametrize(
    ("other", "same"),
    [
        pytest.param(KEYS, True, id="same-keys-same-bits"),
        pytest.param(noise_keys(seed=1234, step=2), False, id="next-step-new-bits"),
        pytest.param(noise_keys(seed=1235, step=1), False, id="other-seed-new-bits"),
    ],
)
def test_random_bits_are_a_function_of_the_keys(other: tuple[int, int], same: bool) -> None:
    first = random_bits16((4096,), KEYS, torch.device("cpu"))
    second = random_bits16((4096,), other, torch.device("cpu"))
    assert torch.equal(first, second) is same
    if not same:
        # Independent draws agree on about 1 element in 65536, not systematically.
        assert (first == second).double().mean().item() < 0.01


def test_keys_fit_the_kernels_arithmetic() -> None:
    for seed, step in [(0, 0), (1, 1), (2**62, 10**9), (derive_seed(5, 6), 3)]:
        multiplier, offset = noise_keys(seed, step)
        assert multiplier % 2 == 1 and 0 < multiplier < 2**31
        assert 0 <= offset < 2**31
    assert 0 <= derive_seed(2**70, -1) < 2**63


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(1.0 + 2.0**-10, id="just-above-one"),
        pytest.param(1.0 + 5 * 2.0**-10, id="past-half-ulp"),
        pytest.param(-3.3, id="negative"),
        pytest.param(1.7e-5, id="small"),
    ],
)
def test_stochastic_rounding_is_unbiased(value: float) -> None:
    lower, upper = bf16_neighbours(value)
    rounded = stochastic_round_bf16_(torch.full((200_000,), value), KEYS)
    assert set(rounded.unique().tolist()) <= {lower, upper}
    assert torch.equal(rounded.to(torch.bfloat16).float(), rounded), "results must be bf16 values"
    gap = upper - lower
    # The mean is value +- gap * 0.5 / sqrt(200k) ~ gap / 900; nearest rounding is off by >= gap / 8 here.
    assert abs(rounded.double().mean().item() - value) < gap / 100
    nearest = torch.tensor(value).to(torch.bfloat16).item()
    assert abs(nearest - value) > gap / 100, "the case must be one that nearest rounding gets wrong"


def test_stochastic_rounding_keeps_representable_values() -> None:
    exact = torch.randn(10_000).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_bf16_(exact.clone(), KEYS), exact)


def test_stochastic_rounding_takes_fp32_only() -> None:
    with pytest.raises(TypeError, match="fp32"):
        stochastic_round_bf16_(torch.zeros(3, dtype=torch.float64), KEYS)


def test_kahan_carries_what_rounding_dropped() -> None:
    param = torch.ones(1000, dtype=torch.bfloat16)
    compensation = torch.zeros(1000, dtype=torch.bfloat16)
    for _ in range(100):
        param.copy_(kahan_round_(param.float().add_(1e-4), compensation, torch.bfloat16))
    # Each 1e-4 is below half a bf16 ulp at 1.0 (2^-8), yet 100 of them add up to 0.01.
    assert torch.allclose(param.float() + compensation.float(), torch.full((1000,), 1.01), atol=1e-3)
    assert abs(param.float().mean().item() - 1.01) < 0.004


@pytest.mark.parametrize(
    ("rounding", "moves"),
    [
        pytest.param("stochastic", True, id="stochastic-moves"),
        pytest.param("kahan", True, id="kahan-moves"),
        pytest.param("nearest", False, id="nearest-stalls"),
    ],
)
def test_small_bf16_updates_accumulate(rounding: str, moves: bool) -> None:
    # Weights of magnitude in [1, 2), steps of 1e-4: each step is ~1/80 of a bf16 ulp there.
    generator = torch.Generator().manual_seed(0)
    start = (1 + torch.rand(4096, generator=generator)).to(torch.bfloat16)
    param = start.clone()
    compensation = torch.zeros_like(param) if rounding == "kahan" else None
    direction = torch.ones(4096)
    for step in range(1, 51):
        keys = noise_keys(7, step)
        apply_update_(
            param, direction, 1e-4, decay=1.0, rounding=rounding, keys=keys, compensation=compensation
        )
    # Kahan's weights are exact only together with their buffer; stochastic rounding's only on average.
    held = param.float() if compensation is None else param.float() + compensation.float()
    moved = (start.float() - held).double().mean().item()
    if moves:
        assert moved == pytest.approx(50 * 1e-4, rel=0.05)
    else:
        assert torch.equal(param, start)


@pytest.mark.parametrize(
    ("dtype", "rounding"),
    [
        pytest.param(torch.float32, "stochastic", id="fp32"),
        pytest.param(torch.bfloat16, "stochastic", id="bf16-stochastic"),
        pytest.param(torch.bfloat16, "kahan", id="bf16-kahan"),
        pytest.param(torch.bfloat16, "nearest", id="bf16-nearest"),
        pytest.param(torch.float16, "stochastic", id="fp16-falls-back-to-nearest"),
    ],
)
def test_update_writes_into_the_same_storage(dtype: torch.dtype, rounding: str) -> None:
    base = torch.randn(96, 64).to(dtype)
    view = base[32:64]  # like a q/k/v slice of vLLM's fused qkv_proj
    before = base.clone()
    pointer = view.data_ptr()
    compensation = torch.zeros_like(view) if rounding == "kahan" else None
    coef = torch.full((1, 64), 0.5)
    apply_update_(
        view, torch.ones(32, 64), coef, decay=0.9, rounding=rounding, keys=KEYS, compensation=compensation
    )
    assert view.data_ptr() == pointer
    assert torch.equal(base[:32], before[:32]) and torch.equal(base[64:], before[64:])
    expected = before[32:64].float() * 0.9 - 0.5
    assert torch.allclose(base[32:64].float(), expected, atol=0.02, rtol=0.01)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("coef_shape", "direction_dtype"),
    [
        pytest.param((3, 1, 1024), torch.bfloat16, id="per-column"),
        pytest.param((3, 1024, 1), torch.bfloat16, id="per-row"),
        pytest.param((3, 1, 1), torch.bfloat16, id="per-tensor"),
        pytest.param(None, torch.float32, id="scalar-fp32-direction"),
    ],
)
def test_fused_kernel_matches_the_eager_path(
    coef_shape: tuple[int, ...] | None, direction_dtype: torch.dtype
) -> None:
    """The Triton kernel on CUDA against the eager path on a CPU copy, bit for bit: a checkpoint resumes to
    the same weights on either device kind. Updates as large as the weights over 3M elements, so that a
    product rounded where the eager path does not (a compiler's own contraction) would show: in the
    interpreter it changed ~15 weights per million (tests/optim/test_rounding_fused.py)."""
    from hogwild.optim import rounding

    if rounding.triton is None:
        pytest.skip("needs triton")
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(1024, 1024, generator=generator).to(torch.bfloat16) for _ in range(3)]
    directions = [torch.randn(1024, 1024, generator=generator).to(direction_dtype) for _ in range(3)]
    coefs = 0.7 if coef_shape is None else torch.rand(coef_shape, generator=generator)
    keys = [noise_keys(seed=i, step=5) for i in range(3)]
    eager = [p.clone() for p in params]
    rounding.apply_updates_(
        eager, directions, coefs, decay=0.999, rounding="stochastic", keys=keys, compensations=[None] * 3
    )
    fused = [p.cuda() for p in params]
    pointers = [p.data_ptr() for p in fused]
    rounding.apply_updates_(
        fused,
        [d.cuda() for d in directions],
        coefs if isinstance(coefs, float) else coefs.cuda(),
        decay=0.999,
        rounding="stochastic",
        keys=keys,
        compensations=[None] * 3,
    )
    assert [p.data_ptr() for p in fused] == pointers
    for start, got, want in zip(params, fused, eager, strict=True):
        differ = int((got.cpu().view(torch.int16) != want.view(torch.int16)).sum())
        assert differ == 0, f"{differ} weights differ from the eager path's"
        assert not torch.equal(want, start), "the update must change the weights"
