"""The pieces of a training step that no module hook cuts: the output head with the loss, the clip, and the
update norm's weight sample.

Each comes whole or preemptible. Whole is one long piece of GPU work (the head, its fp32 logits and the loss
are ~10 ms at 1.5B and 4k tokens; the clip ~18 ms at 7B). Preemptible (`hogwild.worker.protection`) is the
same arithmetic in chunks with a preemption point before each, so a serving step that arrives waits for one
chunk, not the whole piece. The trainer passes a point (the preemptible form) only while serving protection's
`yield_when_busy` is on: the bench measured that the default protection needs both pieces preemptible
(bench/RESULTS.md, "Serving protection"), and with protection off the whole form costs nothing extra.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from hogwild.worker import batches, protection
from hogwild.worker.batches import MicroBatch

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
        return protection.chunked_head_backward(
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
    loss.backward()
    return loss.detach()


def grad_norm_and_clip(
    params: Sequence[torch.Tensor], max_norm: float, point: Callable[[], None] | None = None
) -> float:
    """The total gradient norm (returned, before clipping); clips to `max_norm` unless it is 0."""
    if point is not None:
        return protection.preemptible_clip(params, max_norm, point, CLIP_CHUNK)
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
        return protection.in_pieces(items, CLIP_CHUNK, self.point)

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
