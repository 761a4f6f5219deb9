"""Which parameters of a param group an APOLLO step updates, and in which buckets: worked out once, then reused.

Why: at 1.5B the step is host-bound (bench/NOTES-gpu.md), and sorting 338 parameters into buckets, checking
each one's state and reading its seed every step cost about as much host time as the launches. None of that
changes between steps unless one of the things in `signature` does, or a state is replaced (load_state_dict),
so a `GroupPlan` keeps it. Hyperparameters that only enter the arithmetic (lr, betas, eps, weight_decay,
scale, scale_type, norm_growth_limit, update_proj_gap) are not part of a plan: the step reads them from the
group every time, so a hot change applies on the next step.

Bookkeeping only: no tensor arithmetic here.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hogwild.optim.buckets import MomentBucket, same_shape_groups
from hogwild.optim.rounding import UpdateCache

_GRAD = operator.attrgetter("grad")
# Calls each weak reference: `operator.call` from Python 3.11, the slower methodcaller on 3.10.
_CALL: Callable[[Callable[[], Tensor | None]], Tensor | None] = getattr(
    operator, "call", operator.methodcaller("__call__")
)


@dataclass
class Bucket:
    """Parameters of one shape, dtype, gradient dtype and device (see buckets.same_shape_groups for how many),
    stepped together; and what the step keeps for them from the last step, each checked before it is used."""

    params: list[Tensor]
    states: list[dict[str, Any]]
    key: tuple[int, ...]  # the members' ids: what the moment buckets, buffers and projections are cached by
    seeds: list[int]  # each member's state["seed"]: the rounding noise derives from it
    moments: MomentBucket | None = None  # valid while `intact` (see apollo.Apollo._moments)
    update: UpdateCache = field(default_factory=UpdateCache)  # see rounding.UpdateCache
    # ((rank, dtype, refresh period), the members' projections stacked): see projections.Projections.for_bucket
    projection: tuple[tuple[Any, ...], Tensor] | None = None


# (start, rank, low_rank, the parameters' ids, each gradient's (dtype, layout) or None): see `signature`.
Signature = tuple[int, int, bool, tuple[int, ...], tuple[tuple[torch.dtype, torch.layout] | None, ...]]


@dataclass
class GroupPlan:
    signature: Signature
    stepped: list[Tensor]  # the parameters with a gradient, in order
    states: list[dict[str, Any]]  # their states, the very dicts (load_state_dict replaces them)
    projected: list[Bucket]  # APOLLO buckets
    full: list[Bucket]  # AdamW buckets
    # The gradients `signature` was taken from, by weak reference (a plan must not keep a gradient alive):
    # while the group's are these very tensors, the signature's gradient part needs no reading.
    grads: list[Callable[[], Tensor | None]] = field(default_factory=list)


def _grad_ref(grad: Tensor | None) -> Callable[[], Tensor | None]:
    return _none if grad is None else weakref.ref(grad)


def _none() -> None:
    return None


def fits(plan: GroupPlan, group: Mapping[str, Any], start: int) -> bool:
    """`plan.signature == signature(group, start)`, mostly without reading each gradient's dtype and layout.

    Why: at 1.5B building the signature (~340 gradients) each step was a visible share of the step's host
    time. When every gradient is the very tensor the plan saw (a prepared buffer's views, or gradients a
    loop keeps), only the parameters and the few numbers are compared; otherwise the signature is taken
    and the plan remembers the new gradients if it still fits. A gradient whose dtype or layout changes
    in place (`grad.data = ...` of another dtype) counts as unchanged, as a parameter's does for the plan.
    """
    params = group["params"]
    old = plan.signature
    if (
        old[0] != start
        or old[1] != group["rank"]
        or old[2] != group["low_rank"]
        or len(params) != len(old[3])
    ):
        return False
    grads = list(map(_GRAD, params))
    same = len(plan.grads) == len(grads) and all(map(operator.is_, grads, map(_CALL, plan.grads)))
    # A gradient that was dropped since and freed reads None from its reference too: the count tells.
    if same and sum(map(operator.is_, grads, itertools.repeat(None))) == old[4].count(None):
        return tuple(map(id, params)) == old[3]
    if signature(group, start) != old:
        return False
    plan.grads = list(map(_grad_ref, grads))
    return True


def signature(group: Mapping[str, Any], start: int) -> Signature:
    """What a plan depends on besides the states: which parameters (and where the group starts among all
    of them: seeds derive from that index), which have gradients of what dtype and layout, and what decides
    whether a weight is projected and how big its moments are."""
    params = group["params"]
    grads = [p.grad for p in params]
    return (
        start,
        group["rank"],
        group["low_rank"],
        tuple(map(id, params)),
        tuple(None if g is None else (g.dtype, g.layout) for g in grads),
    )


def still_valid(plan: GroupPlan, state: Mapping[Tensor, dict[str, Any]]) -> bool:
    return all(map(operator.is_, map(state.__getitem__, plan.stepped), plan.states))


def build(
    group: Mapping[str, Any],
    start: int,
    state: Mapping[Tensor, dict[str, Any]],
    projects: Callable[[Tensor, Mapping[str, Any]], bool],
    ensure_state: Callable[[Tensor, int, bool], None],
) -> GroupPlan:
    """The plan of `group` as the step would find it parameter by parameter: states made or remade
    (`ensure_state(param, index, low_rank)`, index counting from 1 over all groups) and buckets in order."""
    stepped: list[Tensor] = []
    projected: list[Tensor] = []
    full: list[Tensor] = []
    for index, param in enumerate(group["params"], start=start + 1):
        if param.grad is None:
            continue
        if param.grad.is_sparse:
            raise RuntimeError("Apollo does not support sparse gradients")
        low_rank = projects(param, group)
        ensure_state(param, index, low_rank)
        stepped.append(param)
        (projected if low_rank else full).append(param)

    def buckets(params: list[Tensor]) -> list[Bucket]:
        out = []
        for members in same_shape_groups(params):
            states = [state[p] for p in members]
            key = tuple(id(p) for p in members)
            out.append(Bucket(members, states, key, [s["seed"] for s in states]))
        return out

    return GroupPlan(
        signature=signature(group, start),
        stepped=stepped,
        states=[state[p] for p in stepped],
        projected=buckets(projected),
        full=buckets(full),
        grads=[_grad_ref(p.grad) for p in group["params"]],
    )
