"""hogwild.optim.factory: the optimizer a config names, and hyperparameter changes while it runs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from hogwild.config import TrainingConfig
from hogwild.optim import (
    OPTIMIZER_HOT_FIELDS,
    OPTIMIZER_RESET_FIELDS,
    Apollo,
    apply_hot_update,
    build_optimizer,
    param_groups,
    state_bytes,
)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict(
        {
            "embed_tokens": torch.nn.Embedding(200, 48),
            "proj": torch.nn.Linear(48, 96),
            "norm": torch.nn.LayerNorm(96),
        }
    )


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    tokens = torch.arange(16) % 200
    hidden = model["norm"](model["proj"](model["embed_tokens"](tokens)))
    optimizer.zero_grad()
    hidden.square().mean().backward()
    optimizer.step()


def config(**changes: Any) -> TrainingConfig:
    return dataclasses.replace(TrainingConfig(), **changes)


@pytest.mark.parametrize(
    ("settings", "kind", "expected"),
    [
        pytest.param(config(), Apollo, {"rank": 64, "scale_type": "channel", "scale": 1.0, "update_proj_gap": 200}, id="apollo-defaults"),
        pytest.param(config(rank=8, scale_type="tensor", update_proj_gap=50, scale=2.0, rounding="kahan"), Apollo, {"rank": 8, "scale_type": "tensor", "update_proj_gap": 50, "scale": 2.0, "rounding": "kahan"}, id="apollo-custom"),
        pytest.param(config(optimizer="apollo-mini"), Apollo, {"rank": 1, "scale_type": "tensor", "scale": math.sqrt(128)}, id="apollo-mini"),
        pytest.param(config(optimizer="apollo-mini", scale=0.5, rank=32), Apollo, {"rank": 1, "scale": 0.5 * math.sqrt(128)}, id="apollo-mini-scale-multiplies"),
        pytest.param(config(optimizer="adamw", lr=3e-4, weight_decay=0.1), torch.optim.AdamW, {"lr": 3e-4, "weight_decay": 0.1}, id="adamw-is-torch"),
        pytest.param(config(lr=2e-5, betas=(0.8, 0.99), eps=1e-6), Apollo, {"lr": 2e-5, "betas": (0.8, 0.99), "eps": 1e-6}, id="common-fields"),
    ],
)  # fmt: skip
def test_config_builds_the_named_optimizer(
    settings: TrainingConfig, kind: type, expected: dict[str, Any]
) -> None:
    optimizer = build_optimizer(tiny_model().parameters(), settings)
    assert type(optimizer) is kind
    group = optimizer.param_groups[0]
    assert {name: group[name] for name in expected} == expected
    assert group["optimizer"] == settings.optimizer


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        pytest.param(config(optimizer="sgd"), "optimizer", id="unknown-optimizer"),
        pytest.param(config(rank=0), "rank", id="apollo-rank-zero"),
        pytest.param(config(optimizer="adamw", lr=-1.0), "lr", id="adamw-negative-lr"),
    ],
)
def test_bad_config_is_rejected_by_name(settings: TrainingConfig, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_optimizer(tiny_model().parameters(), settings)


@pytest.mark.parametrize(
    ("full_rank_embeddings", "embedding_state_shape"),
    [
        pytest.param(False, (200, 8), id="embeddings-projected"),
        pytest.param(True, (200, 48), id="embeddings-adamw"),
    ],
)
def test_embeddings_can_get_full_adamw(
    full_rank_embeddings: bool, embedding_state_shape: tuple[int, int]
) -> None:
    model = tiny_model()
    groups = param_groups(model.named_parameters(), full_rank_embeddings=full_rank_embeddings)
    optimizer = build_optimizer(groups, config(rank=8))
    train_step(model, optimizer)
    embedding = model["embed_tokens"].weight
    assert optimizer.state[embedding]["exp_avg"].shape == embedding_state_shape
    assert optimizer.state[model["proj"].weight]["exp_avg"].shape == (96, 8)  # weight is 96 x 48


def test_frozen_parameters_are_left_out_of_the_groups() -> None:
    model = tiny_model()
    model["norm"].requires_grad_(False)
    groups = param_groups(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == 3  # embedding, proj weight and bias


@pytest.mark.parametrize(
    ("settings", "changes", "applied", "reset", "ignored", "group_values"),
    [
        pytest.param(config(), {"lr": 1e-3}, {"lr"}, set(), set(), {"lr": 1e-3}, id="lr"),
        pytest.param(config(), {"betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.01}, {"betas", "eps", "weight_decay"}, set(), set(), {"betas": (0.8, 0.95), "eps": 1e-6}, id="betas-list-eps-decay"),
        pytest.param(config(), {"scale": 2.0}, {"scale"}, set(), set(), {"scale": 2.0}, id="apollo-scale"),
        pytest.param(config(optimizer="apollo-mini"), {"scale": 2.0}, {"scale"}, set(), set(), {"scale": 2.0 * math.sqrt(128)}, id="mini-scale-multiplies"),
        pytest.param(config(optimizer="adamw"), {"scale": 2.0, "lr": 1e-4}, {"lr"}, set(), {"scale"}, {"lr": 1e-4}, id="adamw-has-no-scale"),
        pytest.param(config(), {"rank": 8, "lr": 1e-3}, {"lr"}, {"rank"}, set(), {"rank": 64, "lr": 1e-3}, id="rank-needs-reset"),
        pytest.param(config(), {"optimizer": "adamw", "rounding": "kahan"}, set(), {"optimizer", "rounding"}, set(), {"rounding": "stochastic"}, id="optimizer-and-rounding-need-reset"),
        pytest.param(config(), {"rank": 64, "scale_type": "channel"}, set(), set(), set(), {}, id="unchanged-values-need-no-reset"),
        pytest.param(config(), {"clip_grad_norm": 0.5, "paused": True}, set(), set(), {"clip_grad_norm", "paused"}, {}, id="not-optimizer-fields"),
    ],
)  # fmt: skip
def test_hot_update(
    settings: TrainingConfig,
    changes: dict[str, Any],
    applied: set[str],
    reset: set[str],
    ignored: set[str],
    group_values: dict[str, Any],
) -> None:
    model = tiny_model()
    optimizer = build_optimizer(model.parameters(), settings)
    train_step(model, optimizer)
    weight = model["proj"].weight
    moments = optimizer.state[weight]["exp_avg"]
    result = apply_hot_update(optimizer, changes)
    assert (result.applied, result.state_reset, result.ignored) == (applied, reset, ignored)
    assert result.needs_reset is bool(reset)
    for group in optimizer.param_groups:
        assert {name: group[name] for name in group_values} == group_values
    assert optimizer.state[weight]["exp_avg"] is moments, "a hot update keeps the optimizer state"
    train_step(model, optimizer)  # and the optimizer still steps


def test_invalid_hot_update_changes_nothing() -> None:
    optimizer = build_optimizer(tiny_model().parameters(), config(lr=1e-4))
    with pytest.raises(ValueError, match="weight_decay"):
        apply_hot_update(optimizer, {"lr": 1e-3, "weight_decay": -1.0})
    assert all(group["lr"] == 1e-4 for group in optimizer.param_groups)


def test_state_resetting_change_is_a_new_optimizer() -> None:
    model = tiny_model()
    settings = config(rank=16)
    optimizer = build_optimizer(model.parameters(), settings)
    train_step(model, optimizer)
    assert apply_hot_update(optimizer, {"rank": 8}).needs_reset
    rebuilt = build_optimizer(model.parameters(), dataclasses.replace(settings, rank=8))
    assert not rebuilt.state
    train_step(model, rebuilt)
    assert rebuilt.state[model["proj"].weight]["exp_avg"].shape == (96, 8)


def test_field_classes_follow_the_design_table() -> None:
    # docs/design.md, "Which spec changes apply hot": the optimizer's part of it.
    assert {"lr", "betas", "eps", "weight_decay", "scale"} == OPTIMIZER_HOT_FIELDS
    assert {"optimizer", "rank", "scale_type", "update_proj_gap", "rounding"} == OPTIMIZER_RESET_FIELDS


def test_apollo_state_is_a_sixth_of_adamw_at_rank_64() -> None:
    def layers() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))

    sizes = {}
    for name in ("apollo", "adamw"):
        model = layers()
        optimizer = build_optimizer(model.parameters(), config(optimizer=name, rank=64))
        model(torch.randn(4, 512)).sum().backward()
        optimizer.step()
        sizes[name] = state_bytes(optimizer)
    assert sizes["apollo"] <= sizes["adamw"] / 6
