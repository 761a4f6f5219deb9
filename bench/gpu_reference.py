"""Float64 references for the GPU fast paths, and the relative-error measure they are judged by.

Used by `gpu_bench.py --part check` and by `tests/worker/test_gpu.py`. Written from the APOLLO paper's Algorithm 1
(arXiv 2412.05270) and the definition of the bf16 update, not from the code under test; the one thing
shared with it is the projection matrix, which is a pure function of (seed, refresh, shape) by design.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Accuracy bands: fp32 arithmetic lands far under 1e-3, bf16 operands between 1e-3 and 1e-2.
FP32_MAX = 1e-3
_TINY = 1e-300
BF16_MAX = 1e-2


def relative_error(fast: Tensor, reference: Tensor) -> float:
    """||fast - ref|| / ||ref|| in float64; NaN if either side has a NaN or inf (never passes a `<` check)."""
    fast64, ref64 = fast.double(), reference.double()
    if not (torch.isfinite(fast64).all() and torch.isfinite(ref64).all()):
        return math.nan
    return float(torch.linalg.vector_norm(fast64 - ref64) / torch.linalg.vector_norm(ref64))


@dataclass(frozen=True)
class ApolloSettings:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    rank: int = 64
    scale_type: str = "channel"
    update_proj_gap: int = 200
    scale: float = 1.0
    norm_growth_limit: float | None = 1.01


def reference_apollo(weight: Tensor, grads: Sequence[Tensor], seed: int, s: ApolloSettings) -> Tensor:
    """W after len(grads) APOLLO steps, every operation in float64 (on the weight's device)."""
    from hogwild.optim import projection_matrix

    device = weight.device
    w = weight.double().clone()
    m, n = w.shape
    moments = (s.rank, n) if m <= n else (m, s.rank)
    exp_avg = torch.zeros(moments, dtype=torch.float64, device=device)
    exp_avg_sq = torch.zeros(moments, dtype=torch.float64, device=device)
    previous = 0.0
    beta1, beta2 = s.betas
    for t, grad in enumerate(grads, start=1):
        g = grad.double()
        refresh = (t - 1) // s.update_proj_gap
        # Steps 1-2: R = P G with P ~ N(0, 1/r) along the smaller side.
        if m <= n:
            r = projection_matrix(seed, refresh, (s.rank, m), s.rank, device).double() @ g
        else:
            r = g @ projection_matrix(seed, refresh, (n, s.rank), s.rank, device).double()
        # Step 3: Adam moments of R, bias-corrected.
        exp_avg = beta1 * exp_avg + (1 - beta1) * r
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * r * r
        r_tilde = (exp_avg / (1 - beta1**t)) / ((exp_avg_sq / (1 - beta2**t)).sqrt() + s.eps)
        # Step 4: channel-wise (or tensor-wise) scaling factors. A channel whose gradient is zero (an
        # embedding row of a token not in the batch) gets no update whatever its factor: take 0, not 0/0.
        if s.scale_type == "channel":
            dim = 0 if m <= n else 1
            factor = r_tilde.norm(dim=dim, keepdim=True) / r.norm(dim=dim, keepdim=True).clamp_min(_TINY)
        else:
            factor = r_tilde.norm() / r.norm().clamp_min(_TINY)
        # Steps 5-6: scaled gradient, norm-growth limiter.
        g_tilde = s.scale * g * factor
        norm = float(g_tilde.norm())
        if s.norm_growth_limit is not None and previous > 0 and norm > s.norm_growth_limit * previous:
            g_tilde = g_tilde * (s.norm_growth_limit * previous / norm)
            norm = s.norm_growth_limit * previous
        previous = norm
        # Step 7: decoupled weight decay and the update.
        w = w * (1 - s.lr * s.weight_decay) - s.lr * g_tilde
    return w


def reference_update(param: Tensor, direction: Tensor, coef: Tensor | float, decay: float) -> Tensor:
    """param * decay - direction * coef in float64: what a bf16 update rounds."""
    c = coef.double() if isinstance(coef, Tensor) else coef
    return param.double() * decay - direction.double() * c
