"""The pieces of a training step that no module hook cuts: the output head with the loss, the clip, and the
update norm's weight sample.

Each comes whole or preemptible. Whole is one long piece of GPU work (the head, its fp32 logits and the loss
are ~10 ms at 1.5B and 4k tokens; the clip ~18 ms at 7B). Preemptible (`chunked_head_backward`,
`preemptible_clip`, `UpdateNormSample` with a point; the gate supplies the point) is the
same arithmetic in chunks (`in_pieces`) with a preemption point before each, so a serving step that arrives
waits for one chunk, not the whole piece. The trainer passes a point (the preemptible form) only while
serving protection's `yield_when_busy` is on: the bench measured that the default protection needs both
pieces preemptible (bench/RESULTS.md, "Serving protection"), and with protection off the whole form costs
nothing extra.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from hogwild.worker import batches
from hogwild.worker.batches import MicroBatch

T = TypeVar("T")

# Tokens per chunk of the preemptible head. A chunk is two pieces (its forward with the loss and the loss's
# backward; then the head's backward, which also adds into the [vocab, hidden] weight gradient); at 1024 rows
# each was ~2 ms at 1.5B on an H100, and a serving step that arrived there took ~4-5 ms longer (bench
# --timeline). 512 halves the matmuls; the gradient add stays per chunk (~0.5 ms, ~1 % of the step).
HEAD_ROWS = 512
# Parameters per piece of the preemptible clip and of the update norm's sample.
CLIP_CHUNK = 32
# The update norm is measured on at most this many weight elements (a strided sample; exact below it), so
# that measuring it never costs a copy of the weights.
UPDATE_NORM_SAMPLE_ELEMENTS = 1 << 24


def micro_batch_backward(
    module: Any,
    micro: MicroBatch,
    targets: int,
    device: torch.device,
    point: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its loss (0-dim, detached).

    The loss is the cross-entropy summed over the micro-batch's targets divided by `targets`, the count over
    ALL the step's micro-batches: so accumulation gives the gradient of one big batch, however it was split.
    """
    ids, labels, mask = (t.to(device) for t in (micro.input_ids, micro.labels, micro.attention_mask))
    if point is not None:
        return chunked_head_backward(
            module, ids, labels, mask, targets, point, rows=HEAD_ROWS, ignore_index=batches.IGNORE
        )
    logits = module(input_ids=ids, attention_mask=mask).logits
    loss = (
        F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            labels[:, 1:].flatten(),
            ignore_index=batches.IGNORE,
            reduction="sum",
        )
        / targets
    )
    torch.autograd.backward(loss)
    return loss.detach()


def grad_norm_and_clip(
    params: Sequence[torch.Tensor], max_norm: float, point: Callable[[], None] | None = None
) -> float:
    """The total gradient norm (returned, before clipping); clips to `max_norm` unless it is 0."""
    if point is not None:
        return preemptible_clip(params, max_norm, point, CLIP_CHUNK)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if max_norm > 0 and torch.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


class UpdateNormSample:
    """||W_after - W_before|| over a step's weights, from a strided sample taken before the step.

    Create it before the optimizer step (it copies the sample then), call `norm()` after. Both halves are a
    kernel or two per parameter: ~1,000 tiny kernels at 1.5B, ~5 ms of GPU time that ran as one piece after
    APOLLO's last bucket, where the slowest serving requests under the default protection arrived (bench
    --timeline). With a `point`, both halves go `CLIP_CHUNK` parameters at a time with a point before each.
    """

    def __init__(self, params: Sequence[torch.Tensor], point: Callable[[], None] | None = None) -> None:
        flat = [p.detach().reshape(-1) for p in params]
        self.stride = max(1, math.ceil(sum(p.numel() for p in flat) / UPDATE_NORM_SAMPLE_ELEMENTS))
        self.samples = [p[:: self.stride] for p in flat]  # views: they see the step's in-place writes
        self.point = point
        self.before = [sample.float() for piece in self._pieces(self.samples) for sample in piece]

    def _pieces(self, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
        return in_pieces(items, CLIP_CHUNK, self.point)

    def norm(self) -> float:
        """The change since the sample was taken, scaled up to all elements (one device sync)."""
        squares = [
            # bf16 minus fp32 promotes to fp32: one kernel for the difference, one for its norm.
            torch.stack([torch.linalg.vector_norm(now - was) for now, was in piece]).square().sum()
            for piece in self._pieces(list(zip(self.samples, self.before, strict=True)))
        ]
        if not squares:
            return 0.0
        return math.sqrt(float(torch.stack(squares).sum()) * self.stride)


def in_pieces(items: Sequence[T], size: int, point: Callable[[], None] | None) -> Iterator[Sequence[T]]:
    """`items` in slices of `size`, `point` called before each one is handed out (lazily, so the point runs
    just before that piece's work is launched); with no point, all of `items` as one piece."""
    if point is None:
        if items:
            yield items
        return
    for start in range(0, len(items), size):
        point()
        yield items[start : start + size]


def preemptible_clip(
    params: Iterable[torch.Tensor], max_norm: float, point: Callable[[], None], chunk: int = 32
) -> float:
    """Total gradient norm, and clip to `max_norm` (0: no clip), `chunk` parameters at a time with a point
    before each piece: the same result as `get_total_norm` + `clip_grads_with_norm_`, but preemptible
    (at 7B the one-piece version is ~18 ms of GPU work). Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    squares = []
    for piece in in_pieces(grads, chunk, point):
        norms = torch._foreach_norm(list(piece), 2.0)
        squares.append(torch.linalg.vector_norm(torch.stack(norms)) ** 2)
    norm = torch.stack(squares).sum().sqrt()
    if max_norm > 0 and torch.isfinite(norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for piece in in_pieces(grads, chunk, point):
            torch._foreach_mul_(list(piece), coef)
    return float(norm)


def chunked_head_backward(
    module: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    targets: int,
    point: Callable[[], None],
    rows: int = 1024,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Forward and backward of one micro-batch with the output head and the loss in chunks of `rows` tokens.

    The loss is the cross-entropy summed over the micro-batch's targets divided by `targets` (the step's
    target count), as `Trainer.backward` computes it; returns it (a 0-dim tensor, no sync). The body runs
    once; the head and the loss run per chunk on a detached copy of the last hidden state, a point before
    each; then the body's backward takes the summed gradient. Same gradients, and no [tokens, vocab] fp32
    logits: one piece of ~10 ms (1.5B, 4k tokens) becomes pieces of ~1 ms, and ~7 GB less memory at 7B.
    """
    hidden = module.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    shifted = labels[:, 1:].reshape(-1)
    leaf = flat.detach().requires_grad_()
    loss_dtype = torch.promote_types(flat.dtype, torch.float32)  # fp32 for bf16, as the trainer computes it
    total = torch.zeros((), device=flat.device, dtype=loss_dtype)
    for start in range(0, flat.shape[0], rows):
        point()
        logits = module.lm_head(leaf[start : start + rows]).to(loss_dtype)
        loss = F.cross_entropy(
            logits, shifted[start : start + rows], ignore_index=ignore_index, reduction="sum"
        )
        loss = loss / targets
        torch.autograd.backward(loss)
        total += loss.detach()
    torch.autograd.backward(flat, leaf.grad)
    return total
