"""APOLLO's random projections (step 1 of `apollo`'s algorithm): generated from a seed, kept for one period.

A projection is a function of (seed, refresh period, rank, dtype), so it is never stored in the optimizer's
state: a resumed run regenerates the same matrices. In memory, the current period's matrices are kept so
that a step does not regenerate them: one per parameter, and for a bucket of same-shape parameters one
stacked (k, r, m) or (k, n, r) tensor whose slices are those same per-parameter matrices (held once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hogwild.optim import plan
from hogwild.optim.rounding import derive_seed

RefreshKey = tuple[int, int, int, torch.dtype]  # what a projection matrix depends on; see refresh_key


def projection_matrix(
    seed: int, refresh: int, shape: tuple[int, int], rank: int, device: torch.device
) -> Tensor:
    """The Gaussian projection of refresh period `refresh`: entries N(0, 1/rank), regenerated, never stored."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, refresh, 0x9E0))
    matrix = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return matrix.mul_(1.0 / math.sqrt(rank))


def refresh_key(state: Mapping[str, Any], group: Mapping[str, Any], dtype: torch.dtype) -> RefreshKey:
    """(seed, refresh period, rank, dtype): the projection of the current step is a function of these."""
    return (state["seed"], (state["step"] - 1) // group["update_proj_gap"], group["rank"], dtype)


class Projections:
    """The current refresh period's projection matrices: per parameter, stacked per bucket, and on the plan's
    buckets (the shortcut a training loop's step takes: one tuple compare instead of a key per member)."""

    def __init__(self) -> None:
        self._single: dict[Tensor, tuple[RefreshKey, Tensor]] = {}
        self._stacked: dict[tuple[int, ...], tuple[tuple[RefreshKey, ...], Tensor]] = {}

    def clear(self) -> None:
        self._single.clear()
        self._stacked.clear()

    def single(
        self, param: Tensor, state: dict[str, Any], group: dict[str, Any], dtype: torch.dtype
    ) -> Tensor:
        """P along the parameter's smaller side, so that the state is r x max(m, n).

        Regenerated from the seed when a refresh period starts, and kept (not in the state) until the next.
        """
        m, n = param.shape
        key = refresh_key(state, group, dtype)
        cached = self._single.get(param)
        if cached is not None and cached[0] == key:
            return cached[1]
        rank = group["rank"]
        shape = (rank, m) if m <= n else (n, rank)
        matrix = projection_matrix(state["seed"], key[1], shape, rank, param.device).to(dtype)
        self._single[param] = (key, matrix)
        return matrix

    def for_bucket(
        self, bucket: plan.Bucket, steps: list[int], group: dict[str, Any], dtype: torch.dtype
    ) -> Tensor:
        """`stacked` for the bucket, kept on it for the rest of the refresh period.

        When the members are at one step (as always in a training loop), their refresh keys are
        (seed, period, rank, dtype) with the plan's seeds and one period: a match of (rank, dtype, period)
        is a match of every member's key, found without a key per member.
        """
        if steps.count(steps[0]) != len(steps):
            return self.stacked(bucket.params, bucket.states, group, dtype)
        quick = (group["rank"], dtype, (steps[0] - 1) // group["update_proj_gap"])
        if bucket.projection is not None and bucket.projection[0] == quick:
            return bucket.projection[1]
        stacked = self.stacked(bucket.params, bucket.states, group, dtype)
        bucket.projection = (quick, stacked)
        return stacked

    def stacked(
        self, params: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any], dtype: torch.dtype
    ) -> Tensor:
        """The parameters' projections stacked, (k, r, m) or (k, n, r); rebuilt when any member's period ends.

        Each parameter's cached matrix becomes a view of the stack, so the projections are held once.
        """
        keys = tuple(refresh_key(s, group, dtype) for s in states)
        members = tuple(id(p) for p in params)
        cached = self._stacked.get(members)
        if cached is not None and cached[0] == keys:
            return cached[1]
        for other in [k for k in self._stacked if set(k) & set(members)]:
            del self._stacked[other]  # a bucket that shared a member is gone
        stacked = torch.stack([self.single(p, s, group, dtype) for p, s in zip(params, states, strict=True)])
        for param, key, matrix in zip(params, keys, stacked, strict=True):
            self._single[param] = (key, matrix)
        self._stacked[members] = (keys, stacked)
        return stacked
