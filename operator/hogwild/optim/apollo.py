"""APOLLO: AdamW-level updates with SGD-like optimizer memory (Zhu et al., arXiv 2412.05270, Algorithm 1).

Why: the worker trains a served model in the GPU memory vLLM leaves over. AdamW keeps two full-size moments
per weight; APOLLO keeps them only for a rank-r random projection of each weight's gradient and uses them
for one thing: how much to scale each channel of the raw gradient. At rank 64 a 4096 x 11008 weight carries
2 * 64 * 11008 floats of state instead of 2 * 4096 * 11008.

For a 2-D weight W (m x n with m <= n; otherwise the projection acts on the other side) at step t:
  1. P ~ N(0, 1/r), r x m, regenerated from a seed kept in the state every `update_proj_gap` steps
  2. R = P G                                                 projected gradient, r x n
  3. M, V = AdamW moments of R;  R~ = M^ / (sqrt(V^) + eps)  bias-corrected
  4. s_j = ||R~[:, j]|| / ||R[:, j]||   channel-wise (APOLLO)
     s   = ||R~|| / ||R||               tensor-wise (APOLLO-Mini: rank 1, scale sqrt(128))
  5. G~ = scale * G diag(s)
  6. norm-growth limiter: if ||G~|| > gamma ||G~_prev||, G~ *= gamma ||G~_prev|| / ||G~||
  7. W <- W (1 - lr wd) - lr G~                              decoupled weight decay
The moments persist across projection refreshes, as in the paper's algorithm. Parameters that are not 2-D
(norms, biases), weights whose smaller side is not larger than the rank, and groups with `low_rank=False`
(e.g. embeddings) get plain AdamW inside the same optimizer. Updates to bf16 weights go through
`rounding.apply_updates_` (stochastic rounding by default), always in place.

Speed: a model has a few dozen parameters of each shape, so the step works per shape ("bucket", see
`buckets`), not per parameter: the moments of a bucket live in shared (k, ...) buffers (each parameter's
state holds views), and a step is a few kernels per bucket. When a training loop zeroes the gradients with
`prepare_grads` instead of `zero_grad`, the gradients of a bucket of small weights are views of one buffer
too, and its projection and gradient norms are one kernel each; otherwise they are one per parameter, with
the same result (large weights stay so on purpose: see PREPARED_MAX_ELEMENTS). The projections of the
current period are kept in memory (r x min(m, n) in the gradient's dtype, not in the state dict).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from hogwild.optim import kernels, plan
from hogwild.optim.buckets import (
    GradBuffer,
    MomentBucket,
    adam_normalized,
    moment_bucket,
    same_shape_groups,
    scaling_factors,
)
from hogwild.optim.hyperparameters import validate_hyperparameters
from hogwild.optim.projections import Projections
from hogwild.optim.rounding import apply_updates_, derive_seed

APOLLO_MINI_SCALE = math.sqrt(128.0)
# The largest weight `prepare_grads` gives a buffer by default. A buffer moves ~8 bytes per element more
# through the backward (the memset, then autograd adds into it instead of keeping its fresh gradient); for
# a weight above ~4M elements that costs more than the step saves by batching it. H100, Qwen2 shapes: the
# step 15.0 -> 11.1 ms with every projected weight buffered, but the backward +3 ms at 1.5B (+15 ms at 7B);
# with this limit 12.2 ms and the backward within noise (7B: step 40.7 -> 39.4 ms, backward within noise).
PREPARED_MAX_ELEMENTS = 1 << 22
_STEP = operator.itemgetter("step")
_EXP_AVG = operator.itemgetter("exp_avg")
_COMPENSATION = operator.methodcaller("get", "compensation")


class Apollo(Optimizer):
    """APOLLO / APOLLO-Mini with AdamW for the parameters it does not project. See the module docstring.

    Per-parameter state: `step` (int), `seed` (int: the projection and the rounding noise derive from it),
    `exp_avg` and `exp_avg_sq` (fp32: r x n or m x r projected, or the parameter's shape for AdamW),
    `update_norm` (0-dim fp32, the limiter's memory; projected parameters only), and `compensation`
    (parameter dtype, only with rounding="kahan" on a bf16/fp16 parameter).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 64,
        scale_type: str = "channel",
        update_proj_gap: int = 200,
        scale: float = 1.0,
        norm_growth_limit: float | None = 1.01,
        rounding: str = "stochastic",
        seed: int = 0,
        low_rank: bool = True,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "rank": rank,
            "scale_type": scale_type,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "norm_growth_limit": norm_growth_limit,
            "rounding": rounding,
            "seed": seed,
            "low_rank": low_rank,
        }
        validate_hyperparameters(defaults)
        super().__init__(params, defaults)
        self._projections = Projections()  # the current refresh period's matrices, never in the state
        self._bucket_cache: dict[tuple[int, ...], MomentBucket] = {}
        self._grad_buffers: dict[tuple[int, ...], GradBuffer] = {}  # see prepare_grads
        self._held: set[int] = set()  # ids of the parameters with a buffer
        self._plans: dict[int, plan.GroupPlan] = {}  # by position of the param group; see `plan`
        # Called before each same-shape bucket of a step, when set: the worker's serving protection waits there
        # while vLLM is busy, so the step is pieces of a few ms, not ~30-60 ms (bench/RESULTS.md). Not state.
        self.preemption_point: Callable[[], None] | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        validate_hyperparameters(self.param_groups[-1])

    @staticmethod
    def projects(param: Tensor, group: Mapping[str, Any]) -> bool:
        """Whether `param` gets the APOLLO update (else AdamW): a 2-D weight wider than the rank both ways."""
        return bool(group["low_rank"]) and param.dim() == 2 and min(param.shape) > group["rank"]

    @torch.no_grad()
    def prepare_grads(self, max_elements: int | None = PREPARED_MAX_ELEMENTS) -> None:
        """Zero the gradients before a backward so that the step can batch: `zero_grad()` for a training loop.

        Each projected weight of at most `max_elements` (None: any size) gets as gradient a view of one
        zeroed (k, m, n) buffer per same-shape bucket; every other gradient is set to None, as `zero_grad()`
        does. Autograd then adds into those views in place (micro-batches accumulate there too), and `step`
        projects such a bucket with one `bmm` and takes its norms with one reduction each, without copying
        the gradients. Gradients that are not (or no longer) exactly a buffer's views take the per-parameter
        path, with the same result.

        The buffers stay allocated between steps (one memset each on later calls; made anew only when the
        bucketing changes): the size of those gradients, 2 bytes per bf16 element. A weight with a buffer
        that gets no gradient in the backward is then stepped with a zero one, as after torch's
        `zero_grad(set_to_none=False)`: its step counts and its moments decay, weight decay applies, and
        the gradient part of its update is 0.
        """
        old, self._grad_buffers = self._grad_buffers, {}
        self._held = set()
        for group in self.param_groups:
            projected = []
            for param in group["params"]:
                small = max_elements is None or param.numel() <= max_elements
                if param.requires_grad and small and self.projects(param, group):
                    projected.append(param)
                else:
                    param.grad = None
            for members in same_shape_groups(projected, grads=False):
                key = tuple(id(p) for p in members)
                buffer = old.pop(key, None)
                if buffer is not None and buffer.fits(members):
                    buffer.grads.zero_()
                else:
                    for param in members:
                        param.grad = None  # free the old gradients before the new buffer
                    buffer = GradBuffer.zeros(members)
                buffer.attach()
                self._grad_buffers[key] = buffer
                self._held.update(key)

    def release_grads(self) -> None:
        """After a step: free every gradient that is not a view of a prepared buffer, as `zero_grad()` would.

        Between steps only the buffers stay allocated; the next `prepare_grads` zeroes them.
        """
        for group in self.param_groups:
            for param in group["params"]:
                if id(param) not in self._held:
                    param.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        start = 0
        for position, group in enumerate(self.param_groups):
            own = self._plan(position, group, start)
            start += len(group["params"])
            for state in own.states:
                state["step"] += 1
            for bucket in own.projected:
                self._point()
                self._apollo_update(bucket, group)
            for bucket in own.full:
                self._point()
                self._adamw_update(bucket, group)
        return loss

    def _plan(self, position: int, group: dict[str, Any], start: int) -> plan.GroupPlan:
        """The group's buckets from the last step, or worked out anew when anything they depend on changed."""
        cached = self._plans.get(position)
        if cached is not None and plan.fits(cached, group, start) and plan.still_valid(cached, self.state):
            return cached
        fresh = plan.build(
            group, start, self.state, self.projects, lambda p, i, low: self._ensure_state(p, group, i, low)
        )
        self._plans[position] = fresh
        return fresh

    def _point(self) -> None:
        if self.preemption_point is not None:
            self.preemption_point()

    def _ensure_state(self, param: Tensor, group: dict[str, Any], index: int, low_rank: bool) -> None:
        """Create the state lazily, or afresh when the moments no longer fit (e.g. the rank changed)."""
        state = self.state[param]
        shape: tuple[int, ...]
        if low_rank:
            m, n = param.shape
            shape = (group["rank"], n) if m <= n else (m, group["rank"])
        else:
            shape = tuple(param.shape)
        if state and tuple(state["exp_avg"].shape) == shape:
            return
        state.clear()
        state["step"] = 0
        state["seed"] = derive_seed(group["seed"], index)
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=param.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=param.device)
        if low_rank:
            state["update_norm"] = torch.zeros((), dtype=torch.float32, device=param.device)
        if group["rounding"] == "kahan" and param.dtype in (torch.bfloat16, torch.float16):
            state["compensation"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _apollo_update(self, bucket: plan.Bucket, group: dict[str, Any]) -> None:
        """Steps 1-7 for parameters of one shape, batched: a few kernels per bucket, and, unless the gradients
        are a prepared buffer (`prepare_grads`), a projection and a norm per parameter."""
        params, states = bucket.params, bucket.states
        moments = self._moments(bucket)
        # The bucket's gradients stacked, when they are the views of one prepared buffer; else a list.
        buffer = self._grad_buffers.get(bucket.key)
        grads: Tensor | list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
        if buffer is not None and buffer.holds(params):
            grads = buffer.grads
        steps = list(map(_STEP, states))
        # Steps 1-2: project each gradient onto its random rank-r space (and, where one kernel can, take
        # the channel norms of step 5 in the same pass over the gradients).
        r, channel_norms = self._project(bucket, grads, steps, group)
        # Steps 3-6: the moments and the Adam-normalized R~ (one kernel with the ratio on CUDA), the scale.
        coefs = scaling_factors(grads, r, None, moments, group, channel_norms=channel_norms, steps=steps)
        # Step 7: W <- W (1 - lr wd) - G diag(lr * scale * limiter * s).
        apply_updates_(
            params,
            grads,
            coefs,
            decay=1.0 - group["lr"] * group["weight_decay"],
            rounding=group["rounding"],
            seeds=bucket.seeds,
            steps=steps,
            compensations=list(map(_COMPENSATION, states)),
            cache=bucket.update,
        )

    def _moments(self, bucket: plan.Bucket) -> MomentBucket:
        """The bucket's moment buffers: those of the last step while intact, else as `moment_bucket` finds them.

        Checked against the plan's states, which while the plan holds are the very dicts of `self.state`:
        the same test as `MomentBucket.intact` without looking each parameter up by tensor.
        """
        moments = bucket.moments
        if moments is None or not all(map(operator.is_, map(_EXP_AVG, bucket.states), moments.views)):
            moments = bucket.moments = moment_bucket(bucket.params, self.state, self._bucket_cache)
        return moments

    def _project(
        self, bucket: plan.Bucket, grads: list[Tensor] | Tensor, steps: list[int], group: dict[str, Any]
    ) -> tuple[Tensor, Tensor | None]:
        """R for each gradient, stacked: (k, r, n) when m <= n, else (k, m, r); fp32. And the gradients'
        channel norms, (k, 1, n) or (k, m, 1), when they came with it; else None.

        On CUDA, bf16 gradients with channel-wise scaling take `kernels.project_with_norms`: one read of
        each gradient for both R and the norms (else `scaling_factors` reads it a second time for them). That
        R is the kernel's fp32 accumulator, whereas a bf16 matmul rounds R to bf16 before `.float()`: more
        accurate, and so not the same bits as the paths below. Elsewhere, stacked gradients take one `bmm`
        with the stacked projections (the same matrices, so the same R as one matmul per gradient); the
        per-gradient path keeps its own matmuls, and on CPU both are bit for bit what they were.
        """
        params, states = bucket.params, bucket.states
        # (a stacked tensor's shape and dtype read without `grads[0]`, which would be an op: a select)
        m, n = grads.shape[1:] if isinstance(grads, Tensor) else grads[0].shape
        wide = m <= n
        if group["scale_type"] == "channel" and kernels.fusable_projection(grads, group["rank"]):
            dtype = grads.dtype if isinstance(grads, Tensor) else grads[0].dtype
            stacked = self._projections.for_bucket(bucket, steps, group, dtype)
            return kernels.project_with_norms(stacked, grads)
        if isinstance(grads, Tensor):
            stacked = self._projections.for_bucket(bucket, steps, group, grads.dtype)
            return (torch.bmm(stacked, grads) if wide else torch.bmm(grads, stacked)).float(), None
        single = self._projections.single
        projected = [
            single(p, s, group, g.dtype) @ g if wide else g @ single(p, s, group, g.dtype)
            for p, g, s in zip(params, grads, states, strict=True)
        ]
        return torch.stack(projected).float(), None

    def _adamw_update(self, bucket: plan.Bucket, group: dict[str, Any]) -> None:
        params, states = bucket.params, bucket.states
        moments = self._moments(bucket)
        grads = torch.stack([p.grad for p in params]).float()  # type: ignore[misc]
        steps = list(map(_STEP, states))
        normalized = adam_normalized(moments, grads, steps, group)
        apply_updates_(
            params,
            normalized,
            group["lr"],
            decay=1.0 - group["lr"] * group["weight_decay"],
            rounding=group["rounding"],
            seeds=bucket.seeds,
            steps=steps,
            compensations=list(map(_COMPENSATION, states)),
            cache=bucket.update,
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but keeps each state tensor's own dtype.

        torch casts floating-point state to the parameter's dtype, which would turn the fp32 moments of a
        bf16 weight into bf16 and break bit-exact resume; here tensors only move to the parameter's device.
        """
        super().load_state_dict(state_dict)
        self._projections.clear()
        self._bucket_cache.clear()
        self._plans.clear()  # the states are new dicts; a plan would notice, this says it
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if saved is not None:
                self.state[param] = {
                    key: value.to(device=param.device, copy=True) if isinstance(value, Tensor) else value
                    for key, value in saved.items()
                }
