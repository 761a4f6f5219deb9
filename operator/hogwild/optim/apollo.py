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

Speed: a model has a few dozen parameters of each shape, so the step works per shape ("bucket"), not per
parameter: the moments of a bucket live in shared (k, ...) buffers (each parameter's state holds views), and
a step is a few kernels per bucket plus a projection matmul and a gradient norm per parameter. The projection
of the current period is kept in memory (r x min(m, n) in the gradient's dtype, not in the state dict).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from hogwild.optim.rounding import ROUNDINGS, apply_updates_, derive_seed, noise_keys

SCALE_TYPES = ("channel", "tensor")
APOLLO_MINI_SCALE = math.sqrt(128.0)
_TINY = torch.finfo(torch.float32).tiny
_CHUNK = 32  # most parameters in one bucket (bounds the transient projected tensors)


def _number(name: str, value: Any, low: float, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")


def _integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _betas(value: Any) -> None:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {value!r}")
    for i, beta in enumerate(value):
        _number(f"betas[{i}]", beta, 0.0)
        if beta >= 1.0:
            raise ValueError(f"betas[{i}] must be < 1, got {beta!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


_CHECKS: dict[str, Callable[[Any], object]] = {
    "lr": lambda v: _number("lr", v, 0.0),
    "betas": _betas,
    "eps": lambda v: _number("eps", v, 0.0, low_open=True),
    "weight_decay": lambda v: _number("weight_decay", v, 0.0),
    "rank": lambda v: _integer("rank", v, 1),
    "scale_type": lambda v: _choice("scale_type", v, SCALE_TYPES),
    "update_proj_gap": lambda v: _integer("update_proj_gap", v, 1),
    "scale": lambda v: _number("scale", v, 0.0, low_open=True),
    "norm_growth_limit": lambda v: None if v is None else _number("norm_growth_limit", v, 1.0),
    "rounding": lambda v: _choice("rounding", v, ROUNDINGS),
    "seed": lambda v: _integer("seed", v, 0),
    "low_rank": lambda v: _flag("low_rank", v),
}


def validate_hyperparameters(values: Mapping[str, Any]) -> None:
    """Raise ValueError, naming the field, for any out-of-range hyperparameter in `values` (others ignored)."""
    for name, check in _CHECKS.items():
        if name in values:
            check(values[name])


def projection_matrix(
    seed: int, refresh: int, shape: tuple[int, int], rank: int, device: torch.device
) -> Tensor:
    """The Gaussian projection of refresh period `refresh`: entries N(0, 1/rank), regenerated, never stored."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, refresh, 0x9E0))
    matrix = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return matrix.mul_(1.0 / math.sqrt(rank))


def _per_param(values: list[float], like: Tensor) -> Tensor | float:
    """One number per bucket member, broadcastable against a (k, ...) tensor; a float when all agree."""
    if all(value == values[0] for value in values):
        return values[0]
    return torch.tensor(values, dtype=torch.float32).view(-1, *[1] * (like.dim() - 1)).to(like.device)


def _adam_normalized(bucket: _Bucket, values: Tensor, steps: list[int], group: dict[str, Any]) -> Tensor:
    """AdamW moments of `values` (k, ...) into the bucket; returns bias-corrected M^ / (sqrt(V^) + eps)."""
    beta1, beta2 = group["betas"]
    bucket.exp_avg.lerp_(values, 1 - beta1)
    bucket.exp_avg_sq.mul_(beta2).addcmul_(values, values, value=1 - beta2)
    denom = (
        bucket.exp_avg_sq.div(_per_param([1 - beta2**t for t in steps], values)).sqrt_().add_(group["eps"])
    )
    return torch.div(bucket.exp_avg, denom).div_(_per_param([1 - beta1**t for t in steps], values))


@dataclass
class _Bucket:
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


def _same_shape_groups(params: list[Tensor]) -> list[list[Tensor]]:
    """Parameters grouped by (shape, dtype, gradient dtype, device), in order, at most _CHUNK a group."""
    groups: dict[tuple[Any, ...], list[Tensor]] = {}
    for param in params:
        key = (tuple(param.shape), param.dtype, param.grad.dtype, param.device)  # type: ignore[union-attr]
        groups.setdefault(key, []).append(param)
    return [group[i : i + _CHUNK] for group in groups.values() for i in range(0, len(group), _CHUNK)]


def _scaling_factors(
    grads: list[Tensor], r: Tensor, r_tilde: Tensor, bucket: _Bucket, group: dict[str, Any]
) -> Tensor:
    """Steps 4-6 for a bucket: lr * scale * limiter * s, shaped (k, 1, n), (k, m, 1) or (k, 1, 1)."""
    k, scale = len(grads), group["scale"]
    if group["scale_type"] == "channel":
        # Step 4 (channel-wise): one factor per column (or row) of the larger side.
        dim = 1 if grads[0].shape[0] <= grads[0].shape[1] else 2  # r is (k, rank, n) or (k, m, rank)
        ratio = torch.linalg.vector_norm(r_tilde, dim=dim, keepdim=True)
        ratio.div_(torch.linalg.vector_norm(r, dim=dim, keepdim=True).clamp_min_(_TINY))
        # ||G diag(s)|| without forming it: sqrt(sum_j s_j^2 ||G[:, j]||^2).
        channel_norms = torch.empty_like(ratio)
        for out, grad in zip(channel_norms, grads, strict=True):
            torch.linalg.vector_norm(grad, dim=dim - 1, keepdim=True, dtype=torch.float32, out=out)
        update_norm = torch.linalg.vector_norm(ratio * channel_norms, dim=(1, 2)).mul_(scale)
    else:
        # Step 4 (tensor-wise): one factor for the whole weight.
        ratio = torch.linalg.vector_norm(r_tilde, dim=(1, 2), keepdim=True)
        ratio.div_(torch.linalg.vector_norm(r, dim=(1, 2), keepdim=True).clamp_min_(_TINY))
        grad_norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
        update_norm = ratio.view(k) * grad_norms * scale
    # Step 5 is the scale; step 6, the norm-growth limiter, compares with the previous step's update.
    limit, previous = group["norm_growth_limit"], bucket.update_norm
    assert previous is not None
    if limit is not None:
        factor = torch.where(previous > 0, (limit * previous / update_norm).clamp(max=1.0), 1.0)
        update_norm = update_norm * factor
        ratio = ratio * factor.view(k, 1, 1)
    previous.copy_(update_norm)
    return ratio.mul_(group["lr"] * scale)


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
        # Per parameter: (seed, refresh period, rank, dtype) -> the projection matrix of that period.
        self._projections: dict[Tensor, tuple[tuple[int, int, int, torch.dtype], Tensor]] = {}
        self._bucket_cache: dict[tuple[int, ...], _Bucket] = {}
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
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            projected: list[Tensor] = []
            full: list[Tensor] = []
            for param in group["params"]:
                index += 1
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("Apollo does not support sparse gradients")
                low_rank = self.projects(param, group)
                self._ensure_state(param, group, index, low_rank)
                self.state[param]["step"] += 1
                (projected if low_rank else full).append(param)
            for same_shape in _same_shape_groups(projected):
                self._point()
                self._apollo_update(same_shape, group)
            for same_shape in _same_shape_groups(full):
                self._point()
                self._adamw_update(same_shape, group)
        return loss

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

    def _bucket(self, params: list[Tensor]) -> _Bucket:
        """The bucket of these parameters, built anew (moving their moments into shared buffers) if needed."""
        key = tuple(id(p) for p in params)
        bucket = self._bucket_cache.get(key)
        if bucket is not None and bucket.intact(self.state):
            return bucket
        states = [self.state[p] for p in params]
        projected = "update_norm" in states[0]
        bucket = _Bucket(
            params=list(params),
            exp_avg=torch.stack([s["exp_avg"] for s in states]),
            exp_avg_sq=torch.stack([s["exp_avg_sq"] for s in states]),
            update_norm=torch.stack([s["update_norm"] for s in states]) if projected else None,
            views=[],
        )
        for i, state in enumerate(states):
            state["exp_avg"], state["exp_avg_sq"] = bucket.exp_avg[i], bucket.exp_avg_sq[i]
            if bucket.update_norm is not None:
                state["update_norm"] = bucket.update_norm[i]
            bucket.views.append(state["exp_avg"])
        # Buckets that shared a member are gone; their other members get moments of their own.
        for other in [k for k in self._bucket_cache if set(k) & set(key)]:
            old = self._bucket_cache.pop(other)
            for param, view in zip(old.params, old.views, strict=True):
                if id(param) not in key and self.state[param].get("exp_avg") is view:
                    for name in ("exp_avg", "exp_avg_sq", "update_norm"):
                        if name in self.state[param]:
                            self.state[param][name] = self.state[param][name].clone()
        self._bucket_cache[key] = bucket
        return bucket

    def _apollo_update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """Steps 1-7 for parameters of one shape, batched: a few kernels per bucket, three per parameter."""
        bucket = self._bucket(params)
        states = [self.state[p] for p in params]
        grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
        # Steps 1-2: project each gradient onto its random rank-r space.
        r = self._project(params, grads, states, group)
        # Step 3: AdamW moments and the Adam-normalized update, in the projected space.
        r_tilde = _adam_normalized(bucket, r, [s["step"] for s in states], group)
        coefs = _scaling_factors(grads, r, r_tilde, bucket, group)
        # Step 7: W <- W (1 - lr wd) - G diag(lr * scale * limiter * s).
        apply_updates_(
            params,
            grads,
            coefs,
            decay=1.0 - group["lr"] * group["weight_decay"],
            rounding=group["rounding"],
            keys=[noise_keys(s["seed"], s["step"]) for s in states],
            compensations=[s.get("compensation") for s in states],
        )

    def _project(
        self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
    ) -> Tensor:
        """R for each gradient, stacked: (k, r, n) when m <= n, else (k, m, r); fp32."""
        m, n = grads[0].shape
        wide = m <= n
        projected = [
            self._projection(p, s, group, g.dtype) @ g if wide else g @ self._projection(p, s, group, g.dtype)
            for p, g, s in zip(params, grads, states, strict=True)
        ]
        return torch.stack(projected).float()

    def _projection(
        self, param: Tensor, state: dict[str, Any], group: dict[str, Any], dtype: torch.dtype
    ) -> Tensor:
        """Step 1: P along the smaller side, so that the state is r x max(m, n).

        Regenerated from the seed when a refresh period starts, and kept (not in the state) until the next.
        """
        m, n = param.shape
        rank = group["rank"]
        key = (state["seed"], (state["step"] - 1) // group["update_proj_gap"], rank, dtype)
        cached = self._projections.get(param)
        if cached is not None and cached[0] == key:
            return cached[1]
        shape = (rank, m) if m <= n else (n, rank)
        matrix = projection_matrix(state["seed"], key[1], shape, rank, param.device).to(dtype)
        self._projections[param] = (key, matrix)
        return matrix

    def _adamw_update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        bucket = self._bucket(params)
        states = [self.state[p] for p in params]
        grads = torch.stack([p.grad for p in params]).float()  # type: ignore[misc]
        normalized = _adam_normalized(bucket, grads, [s["step"] for s in states], group)
        apply_updates_(
            params,
            normalized,
            group["lr"],
            decay=1.0 - group["lr"] * group["weight_decay"],
            rounding=group["rounding"],
            keys=[noise_keys(s["seed"], s["step"]) for s in states],
            compensations=[s.get("compensation") for s in states],
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but keeps each state tensor's own dtype.

        torch casts floating-point state to the parameter's dtype, which would turn the fp32 moments of a
        bf16 weight into bf16 and break bit-exact resume; here tensors only move to the parameter's device.
        """
        super().load_state_dict(state_dict)
        self._projections.clear()
        self._bucket_cache.clear()
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if saved is not None:
                self.state[param] = {
                    key: value.to(device=param.device, copy=True) if isinstance(value, Tensor) else value
                    for key, value in saved.items()
                }
