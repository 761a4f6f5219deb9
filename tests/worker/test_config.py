"""Hyperparameter validation and the hot / state-resetting split of docs/design.md."""

from __future__ import annotations

import pytest

from hogwild.config import ConfigError, TrainingConfig, apply_changes, config_from_dict, config_to_dict

BAD = {
    "lr negative": ({"lr": -1.0}, "lr"),
    "lr string": ({"lr": "fast"}, "lr"),
    "lr bool": ({"lr": True}, "lr"),
    "rank zero": ({"rank": 0}, "rank"),
    "rank fraction": ({"rank": 2.5}, "rank"),
    "optimizer unknown": ({"optimizer": "sgd"}, "optimizer"),
    "scale type": ({"scale_type": "row"}, "scale_type"),
    "betas one": ({"betas": [0.9]}, "betas"),
    "beta too big": ({"betas": [0.9, 1.0]}, r"betas\[1\]"),
    "paused string": ({"paused": "yes"}, "paused"),
    "unknown field": ({"learning_rate": 1e-3}, "unknown"),
    "protection unknown": ({"protection": {"speed": 1}}, "protection"),
    "duty cycle zero": ({"protection": {"max_duty_cycle": 0}}, "max_duty_cycle"),
    "inf clip": ({"clip_grad_norm": float("inf")}, "clip_grad_norm"),
}


@pytest.mark.parametrize(("changes", "field"), BAD.values(), ids=BAD.keys())
def test_bad_values_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        apply_changes(TrainingConfig(), changes)


SPLIT = {
    "lr is hot": ({"lr": 0.5}, False),
    "paused is hot": ({"paused": True}, False),
    "interval is hot": ({"checkpoint_interval_s": 5}, False),
    "protection is hot": ({"protection": {"max_duty_cycle": 0.5}}, False),
    "rank resets": ({"rank": 8}, True),
    "optimizer resets": ({"optimizer": "adamw"}, True),
    "scale type resets": ({"scale_type": "tensor"}, True),
    "proj gap resets": ({"update_proj_gap": 7}, True),
    "same rank does not reset": ({"rank": 64}, False),
}


@pytest.mark.parametrize(("changes", "resets"), SPLIT.values(), ids=SPLIT.keys())
def test_state_reset_only_for_state_fields(changes: dict, resets: bool) -> None:
    _, reset = apply_changes(TrainingConfig(), changes)
    assert reset is resets


def test_defaults_are_apollo_rank_64() -> None:
    config = TrainingConfig()
    assert (config.optimizer, config.rank) == ("apollo", 64)


def test_dict_round_trip() -> None:
    config = config_from_dict({"lr": 0.01, "betas": [0.8, 0.95], "protection": {"max_duty_cycle": 0.25}})
    assert config_from_dict(config_to_dict(config)) == config
    assert config.protection.max_duty_cycle == 0.25
