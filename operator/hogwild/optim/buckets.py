"""The per-shape ("bucket") arithmetic of an APOLLO step, and the gradient buffers that let it batch.

Why: a model has a few dozen weights of each shape, and an op launched per weight made the step overhead
bound (23 ms at 1.5B on an H100 against a ~4 ms bytes floor, bench/NOTES-gpu.md). Here each op takes a
bucket's (k, ...) stack at once: the moments live in shared buffers (`MomentBucket`), and with a
`GradBuffer` the gradients do too, so that the projection is one `bmm` and the channel norms one reduction.

Pure tensor math on what is passed in: no I/O, no optimizer state of its own. `apollo.Apollo` owns the
buckets and says what the steps of the algorithm are.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hogwild.optim import moments_kernel
from hogwild.optim.kernels import channel_norms_

CHUNK = 32  # most parameters in one bucket (bounds the transient projected tensors)
# Most weight elements in one bucket. A bucket is one piece of GPU work between the worker's preemption
# points: 28 x 13.7M elements (the 1.5B MLP weights) took ~1.5 ms and were the slowest serving requests'
# collisions once the other pieces were cut (bench --timeline); 7B's 28 x 68M were ~6 ms. At this budget a
# piece moves ~1.5 GB (~0.5 ms), and the 1.5B step has 3 more buckets.
BUCKET_ELEMENTS = 1 << 28
_TINY = torch.finfo(torch.float32).tiny
_GRAD = operator.attrgetter("grad")


def same_shape_groups(params: list[Tensor], *, grads: bool = True) -> list[list[Tensor]]:
    """Parameters grouped by (shape, dtype, gradient dtype, device), in order, split into near-equal buckets
    of at most CHUNK parameters and BUCKET_ELEMENTS elements (at least one parameter each).

    With `grads=False` the gradient dtype is taken to be the parameter's, which is what autograd makes.
    """
    groups: dict[tuple[Any, ...], list[Tensor]] = {}
    for param in params:
        grad_dtype = param.grad.dtype if grads else param.dtype  # type: ignore[union-attr]
        groups.setdefault((tuple(param.shape), param.dtype, grad_dtype, param.device), []).append(param)
    buckets: list[list[Tensor]] = []
    for group in groups.values():
        most = max(1, min(CHUNK, BUCKET_ELEMENTS // max(1, group[0].numel())))
        count = -(-len(group) // most)
        size = -(-len(group) // count)  # e.g. 28 weights, at most 19 a bucket: 14 + 14, not 19 + 9
        buckets.extend(group[i : i + size] for i in range(0, len(group), size))
    return buckets


@dataclass
class MomentBucket:
    """Parameters of one shape whose moments live in shared (k, ...) buffers, so each step op is one kernel.

    Each parameter's state holds views of the buffers (`exp_avg` is `bucket.exp_avg[i]`): the state dict
    stays per parameter, and loading one replaces the views, which `intact` notices.
    """

    params: list[Tensor]
    exp_avg: Tensor
    exp_avg_sq: Tensor
    update_norm: Tensor | None
    views: list[Tensor]  # the `exp_avg` view each parameter's state holds

    def intact(self, state: Mapping[Tensor, dict[str, Any]]) -> bool:
        return all(state[p]["exp_avg"] is view for p, view in zip(self.params, self.views, strict=True))


def moment_bucket(
    params: list[Tensor], state: Mapping[Tensor, dict[str, Any]], cache: dict[tuple[int, ...], MomentBucket]
) -> MomentBucket:
    """The bucket of these parameters from `cache`, or built anew, moving their moments (in `state`) into
    shared buffers."""
    key = tuple(id(p) for p in params)
    bucket = cache.get(key)
    if bucket is not None and bucket.intact(state):
        return bucket
    states = [state[p] for p in params]
    projected = "update_norm" in states[0]
    bucket = MomentBucket(
        params=list(params),
        exp_avg=torch.stack([s["exp_avg"] for s in states]),
        exp_avg_sq=torch.stack([s["exp_avg_sq"] for s in states]),
        update_norm=torch.stack([s["update_norm"] for s in states]) if projected else None,
        views=[],
    )
    for i, own in enumerate(states):
        own["exp_avg"], own["exp_avg_sq"] = bucket.exp_avg[i], bucket.exp_avg_sq[i]
        if bucket.update_norm is not None:
            own["update_norm"] = bucket.update_norm[i]
        bucket.views.append(own["exp_avg"])
    # Buckets that shared a member are gone; their other members get moments of their own.
    for other in [k for k in cache if set(k) & set(key)]:
        old = cache.pop(other)
        for param, view in zip(old.params, old.views, strict=True):
            if id(param) not in key and state[param].get("exp_avg") is view:
                for name in ("exp_avg", "exp_avg_sq", "update_norm"):
                    if name in state[param]:
                        state[param][name] = state[param][name].clone()
    cache[key] = bucket
    return bucket


@dataclass
class GradBuffer:
    """One contiguous (k, *shape) buffer whose slices are the gradients of a bucket's parameters.

    Autograd adds into an existing `.grad` in place (outside `create_graph`), so after backward each
    parameter's gradient is still its view, and the step reads the bucket's gradients as one stacked tensor,
    without a copy. `holds` checks that rather than assuming it.
    """

    params: list[Tensor]
    grads: Tensor
    views: list[Tensor]  # grads[i], the tensor that params[i].grad is

    @classmethod
    def zeros(cls, params: list[Tensor]) -> GradBuffer:
        first = params[0]
        grads = torch.zeros((len(params), *first.shape), dtype=first.dtype, device=first.device)
        return cls(list(params), grads, list(grads.unbind(0)))

    def fits(self, params: list[Tensor]) -> bool:
        """Whether the buffer still has the shape, dtype and device these parameters' gradients need."""
        first = params[0]
        grads = self.grads
        return grads.shape[1:] == first.shape and grads.dtype == first.dtype and grads.device == first.device

    def attach(self) -> None:
        """Make each parameter's gradient its view (most calls find it already is)."""
        for param, view in zip(self.params, self.views, strict=True):
            if param.grad is not view:
                param.grad = view

    def holds(self, params: Sequence[Tensor]) -> bool:
        """Whether `params` are this buffer's, in order, and each gradient is still its slice of the buffer.

        False after anything replaced a gradient (`create_graph` accumulation, `p.grad = ...`, `zero_grad()`).
        """
        if len(params) != len(self.params):
            return False
        if not all(map(operator.is_, params, self.params)) or not all(
            map(operator.is_, map(_GRAD, params), self.views)
        ):
            return False
        # (one pass of C-level maps each: the step asks this of every prepared bucket, every step)
        base, size = self.grads.data_ptr(), self.grads.stride(0) * self.grads.element_size()
        strides = self.grads.stride()[1:]
        where = [base + i * size for i in range(len(self.views))]
        return list(map(Tensor.data_ptr, self.views)) == where and all(
            map(operator.eq, map(Tensor.stride, self.views), itertools.repeat(strides))
        )


def per_param(values: list[float], like: Tensor) -> Tensor | float:
    """One number per bucket member, broadcastable against a (k, ...) tensor; a float when all agree."""
    if all(value == values[0] for value in values):
        return values[0]
    return torch.tensor(values, dtype=torch.float32).view(-1, *[1] * (like.dim() - 1)).to(like.device)


def adam_normalized(
    bucket: MomentBucket, values: Tensor, steps: list[int], group: Mapping[str, Any]
) -> Tensor:
    """AdamW moments of `values` (k, ...) into the bucket; returns bias-corrected M^ / (sqrt(V^) + eps)."""
    beta1, beta2 = group["betas"]
    bucket.exp_avg.lerp_(values, 1 - beta1)
    bucket.exp_avg_sq.mul_(beta2).addcmul_(values, values, value=1 - beta2)
    denom = bucket.exp_avg_sq.div(per_param([1 - beta2**t for t in steps], values)).sqrt_().add_(group["eps"])
    return torch.div(bucket.exp_avg, denom).div_(per_param([1 - beta1**t for t in steps], values))


def _norm_ratio(r: Tensor, r_tilde: Tensor, dims: tuple[int, ...]) -> Tensor:
    """||R~|| / ||R|| along `dims`, and 0 where R is 0.

    R is 0 where the gradient is (a channel, or a whole weight that got none): its update there is 0 times
    the ratio, and the moments may still hold an earlier direction, so ||R~|| / tiny could overflow to inf
    and make that product NaN. 0 keeps the update at 0 and the limiter's norm finite.
    """
    norm_r = torch.linalg.vector_norm(r, dim=dims, keepdim=True)
    has_gradient = norm_r > 0
    ratio = torch.linalg.vector_norm(r_tilde, dim=dims, keepdim=True).div_(norm_r.clamp_min_(_TINY))
    return torch.where(has_gradient, ratio, 0.0)


def _moments_and_ratio(
    bucket: MomentBucket,
    r: Tensor,
    r_tilde: Tensor | None,
    steps: Sequence[int] | None,
    group: Mapping[str, Any],
    dims: tuple[int, ...],
    channel_norms: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Step 4's ratio ||R~|| / ||R|| along `dims`, after step 3 (the moments of R, with `steps`) when
    `r_tilde` is None; and, when the fused kernel took `channel_norms`, each member's update norm.

    Fused (`moments_kernel`): one launch for the moments, the ratio and scale * ||ratio * channel norms||
    where the eager ops were ~12 launches over R-sized tensors, a bucket of a step that is partly host-bound.
    Taken for channel-wise scaling of fp32 contiguous R and moments on CUDA with Triton. Everywhere else (CPU,
    no Triton, tensor-wise APOLLO-Mini, other dtypes) `adam_normalized` and `_norm_ratio` run, bit for bit
    as before; they are also the kernel's reference.
    """
    if r_tilde is not None:
        return _norm_ratio(r, r_tilde, dims), None
    assert steps is not None, "the moments of R need the members' step counts"
    exp_avg, exp_avg_sq = bucket.exp_avg, bucket.exp_avg_sq
    channel_wise = group["scale_type"] == "channel" and len(dims) == 1
    if channel_wise and moments_kernel.fusable(r, exp_avg, exp_avg_sq, channel_norms, dims[0]):
        corrections = moments_kernel.bias_corrections(steps, group["betas"], r.device)
        return moments_kernel.moments_and_ratio_(
            r, exp_avg, exp_avg_sq, corrections, dim=dims[0], betas=group["betas"], eps=group["eps"],
            channel_norms=channel_norms, scale=group["scale"],
        )  # fmt: skip
    return _norm_ratio(r, adam_normalized(bucket, r, list(steps), group), dims), None


def scaling_factors(
    grads: Sequence[Tensor] | Tensor,
    r: Tensor,
    r_tilde: Tensor | None,
    bucket: MomentBucket,
    group: Mapping[str, Any],
    *,
    channel_norms: Tensor | None = None,
    steps: Sequence[int] | None = None,
) -> Tensor:
    """Steps 4-6 for a bucket: lr * scale * limiter * s, shaped (k, 1, n), (k, m, 1) or (k, 1, 1).

    `grads` is a list of the bucket's gradients, or all of them stacked (k, m, n): then each norm below is
    one kernel for the bucket instead of one per gradient, with the same result. `channel_norms`, (k, 1, n)
    or (k, m, 1) fp32, are the gradients' channel norms when the projection took them
    (`kernels.project_with_norms`): then channel-wise scaling does not read the gradients again.

    `r_tilde` None: step 3 is done here too, the moments of R into `bucket` with the members' `steps`; on
    CUDA that takes one kernel with the ratio (see `_moments_and_ratio`).
    """
    k, scale = r.shape[0], group["scale"]
    m, n = grads.shape[1:] if isinstance(grads, Tensor) else grads[0].shape  # (grads[0] of a tensor: an op)
    stacked = isinstance(grads, Tensor)
    if group["scale_type"] == "channel":
        # Step 4 (channel-wise): one factor per column (or row) of the larger side.
        dim = 1 if m <= n else 2  # r is (k, rank, n) or (k, m, rank)
        ratio, fused_norm = _moments_and_ratio(bucket, r, r_tilde, steps, group, (dim,), channel_norms)
        # ||G diag(s)|| without forming it: sqrt(sum_j s_j^2 ||G[:, j]||^2).
        if channel_norms is None:
            if isinstance(grads, Tensor):  # (not `stacked`: mypy narrows on isinstance only)
                channel_norms = torch.linalg.vector_norm(grads, dim=dim, keepdim=True, dtype=torch.float32)
            else:
                # One kernel for the bucket on CUDA (bf16), else one norm per gradient: separate allocations.
                channel_norms = channel_norms_(torch.empty_like(ratio), grads, dim - 1)
        if fused_norm is not None:
            update_norm = fused_norm  # the kernel took the norms of G with the ratio
        else:
            update_norm = torch.linalg.vector_norm(ratio * channel_norms, dim=(1, 2)).mul_(scale)
    else:
        # Step 4 (tensor-wise): one factor for the whole weight.
        ratio, _ = _moments_and_ratio(bucket, r, r_tilde, steps, group, (1, 2), None)
        if stacked:
            grad_norms = torch.linalg.vector_norm(grads, dim=(1, 2), dtype=torch.float32)
        else:
            grad_norms = torch.stack(torch._foreach_norm(list(grads), 2, dtype=torch.float32))
        update_norm = ratio.view(k) * grad_norms * scale
    # Step 5 is the scale; step 6, the norm-growth limiter, compares with the previous step's update.
    limit, previous = group["norm_growth_limit"], bucket.update_norm
    assert previous is not None
    if moments_kernel.limiter_fusable(ratio, previous, update_norm):
        return moments_kernel.limit_and_scale_(ratio, previous, update_norm, limit, group["lr"] * scale)
    if limit is not None:
        factor = torch.where(previous > 0, (limit * previous / update_norm).clamp(max=1.0), 1.0)
        torch.mul(update_norm, factor, out=previous)  # the product, written where a copy_ would put it
        ratio = ratio * factor.view(k, 1, 1)
    else:
        previous.copy_(update_norm)
    return ratio.mul_(group["lr"] * scale)
