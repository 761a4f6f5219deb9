"""Projections whose large matmuls run in pieces with a preemption point before each (worker/protection/preemptible_linear).

Real torch autograd in float64 on CPU: the pieces must give the same outputs and gradients as `F.linear`, and
call the point where the docstring says (the GPU timing effect is measured by bench --part interference).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from hogwild.worker.protection import install_preemption_points, preemptible_linear
from hogwild.worker.protection.preemptible_linear import piece_count, piecewise_forward, row_blocks
from model_helpers import tiny_qwen2


@pytest.mark.parametrize(
    ("rows", "reduced", "cols", "piece_flops", "count"),
    [
        pytest.param(4096, 3584, 18944, 2e11, 3, id="7b-mlp-4k-tokens"),
        pytest.param(4096, 1536, 8960, 2e11, 1, id="1.5b-mlp-stays-whole"),
        pytest.param(512, 3584, 152064, 2e11, 3, id="7b-head-chunk"),
        pytest.param(3, 1000, 1000, 1.0, 3, id="never-more-pieces-than-rows"),
        pytest.param(0, 10, 10, 2e11, 1, id="empty"),
    ],
)
def test_piece_count(
    monkeypatch: pytest.MonkeyPatch, rows: int, reduced: int, cols: int, piece_flops: float, count: int
) -> None:
    monkeypatch.setattr(preemptible_linear, "PIECE_FLOPS", piece_flops)
    assert piece_count(rows, reduced, cols) == count


@pytest.mark.parametrize(
    ("rows", "count", "align", "sizes"),
    [
        pytest.param(10, 3, 1, [4, 4, 2], id="unaligned"),
        pytest.param(9, 3, 1, [3, 3, 3], id="even"),
        pytest.param(2, 1, 64, [2], id="whole"),
        pytest.param(18944, 3, 64, [6336, 6336, 6272], id="7b-gate-weight-gradient"),
        pytest.param(100, 3, 64, [64, 36], id="fewer-blocks-than-asked"),
    ],
)
def test_row_blocks_cover_every_row_once(rows: int, count: int, align: int, sizes: list[int]) -> None:
    blocks = row_blocks(rows, count, align)
    assert all(b.start % align == 0 for b in blocks)
    assert [b.stop - b.start for b in blocks] == sizes
    assert blocks[0].start == 0 and blocks[-1].stop == rows
    assert all(a.stop == b.start for a, b in itertools.pairwise(blocks))


# (input shape, in, out, bias, input needs grad, weight needs grad, expected points: forward, backward).
# PIECE_FLOPS is 80 (and blocks start anywhere), so each matmul of 6 tokens x 5 in x 4 out (240 FLOPs) asks for
# 3 pieces: the forward and the input gradient get 3 blocks of 2 tokens, the weight gradient 2 blocks of 2 of
# its 4 rows. A point comes before each piece but the first, and before the first weight piece when the input
# gradient launched already.
CASES = [
    ((2, 3, 5), 5, 4, True, True, True, 2, 2 + 2),
    ((6, 5), 5, 4, False, True, True, 2, 2 + 2),
    ((6, 5), 5, 4, True, False, True, 2, 1),  # no input gradient: the first weight piece needs no point
    ((6, 5), 5, 4, True, True, False, 2, 2),  # frozen weight: only the input gradient's pieces
]


@pytest.mark.parametrize(
    ("shape", "fan_in", "fan_out", "bias", "input_grad", "weight_grad", "forward_points", "backward_points"),
    CASES,
)
def test_pieces_give_the_same_outputs_and_gradients_as_linear(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    fan_in: int,
    fan_out: int,
    bias: bool,
    input_grad: bool,
    weight_grad: bool,
    forward_points: int,
    backward_points: int,
) -> None:
    monkeypatch.setattr(preemptible_linear, "PIECE_FLOPS", 80.0)
    monkeypatch.setattr(preemptible_linear, "ALIGN_ROWS", 1)
    torch.manual_seed(0)
    layer = torch.nn.Linear(fan_in, fan_out, bias=bias, dtype=torch.float64)
    layer.weight.requires_grad_(weight_grad)
    inputs = torch.randn(shape, dtype=torch.float64, requires_grad=input_grad)
    upstream = torch.randn(*shape[:-1], fan_out, dtype=torch.float64)

    expected = F.linear(inputs, layer.weight, layer.bias)
    expected.backward(upstream)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    input_grad_expected = inputs.grad.clone() if input_grad else None
    layer.zero_grad(set_to_none=True)
    inputs.grad = None

    points: list[str] = []
    out = piecewise_forward(layer, lambda: points.append("point"))(inputs)
    assert len(points) == forward_points
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    out.backward(upstream)
    assert len(points) == forward_points + backward_points
    for name, param in layer.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-14, atol=1e-14)
        else:
            assert param.grad is None
    if input_grad_expected is not None:
        torch.testing.assert_close(inputs.grad, input_grad_expected, rtol=1e-14, atol=1e-14)


def test_no_pieces_while_protection_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """`active` false (the worker passes "protection is on"): torch's own linear, whatever the size."""
    monkeypatch.setattr(preemptible_linear, "PIECE_FLOPS", 1.0)
    layer = torch.nn.Linear(8, 8)
    inputs = torch.randn(4, 8, requires_grad=True)
    protecting = [False]
    forward = piecewise_forward(layer, lambda: None, lambda: protecting[0])
    assert "PiecewiseLinear" not in type(forward(inputs).grad_fn).__name__
    protecting[0] = True
    assert "PiecewiseLinear" in type(forward(inputs).grad_fn).__name__


def test_small_matmuls_take_torchs_own_linear() -> None:
    layer = torch.nn.Linear(8, 8)
    inputs = torch.randn(4, 8, requires_grad=True)
    points: list[str] = []
    out = piecewise_forward(layer, lambda: points.append("point"))(inputs)
    assert "PiecewiseLinear" not in type(out.grad_fn).__name__
    out.sum().backward()
    assert points == []


@pytest.mark.parametrize(
    ("split", "extra_points"),
    [pytest.param(False, False, id="whole-projections"), pytest.param(True, True, id="split-projections")],
)
def test_a_model_with_split_projections_learns_the_same_gradients(
    monkeypatch: pytest.MonkeyPatch, split: bool, extra_points: bool
) -> None:
    """The trainer's path: `install_preemption_points` on a Qwen2 model (tied head), split or not."""
    monkeypatch.setattr(
        preemptible_linear, "PIECE_FLOPS", 2.0 * 8 * 64 * 64
    )  # >= 2 pieces for each projection
    monkeypatch.setattr(preemptible_linear, "ALIGN_ROWS", 8)
    model = tiny_qwen2(tied=True, vocab=100)
    ids = torch.randint(0, 100, (2, 16))
    model(input_ids=ids).logits.square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    points: list[str] = []
    remove = install_preemption_points(model, lambda: points.append("point"), "linear", split_matmuls=split)
    model(input_ids=ids).logits.square().mean().backward()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    blocks = 1 + 2 + len(linears)  # embedding, layers, every projection and the head
    assert (len(points) > 2 * blocks) is extra_points
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-12, atol=1e-14)
    remove()
    assert not any("forward" in vars(m) for m in linears)
