"""The two pieces of a training step that no module hook cuts: the output head with the loss, and the clip.

Each comes whole or preemptible. Whole is one long piece of GPU work (the head, its fp32 logits and the loss
are ~10 ms at 1.5B and 4k tokens; the clip ~18 ms at 7B). Preemptible (`hogwild.worker.protection`) is the
same arithmetic in chunks with a preemption point before each, so a serving step that arrives waits for one
chunk, not the whole piece. The trainer passes a point (the preemptible form) only while serving protection's
`yield_when_busy` is on: the bench measured that the default protection needs both pieces preemptible
(bench/RESULTS.md, "Serving protection"), and with protection off the whole form costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from hogwild.worker import batches, protection
from hogwild.worker.batches import MicroBatch

# Tokens per chunk of the preemptible head: ~1 ms of GPU work at 1.5B, as measured (`yield-fine-4k`).
HEAD_ROWS = 1024
# Parameters per piece of the preemptible clip.
CLIP_CHUNK = 32


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
