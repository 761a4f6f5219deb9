"""Which spec changes apply hot and which need a new pod (docs/design.md's table), and that the pod agrees."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from hogwild.config import TrainingConfig, config_to_dict
from hogwild.operator import builders, pod_builder
from hogwild.operator.diff import SpecDiff, config_changes, diff_specs, restart_reason
from hogwild.operator.spec import Images, parse_spec

SESSION = builders.SessionRef(name="chat", namespace="ml", uid="u-1")
BASE: dict[str, Any] = {"model": {"path": "/models/qwen"}}


def changed(path: str, value: Any) -> dict[str, Any]:
    """BASE with one field (dotted path under spec) set."""
    spec = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return spec


def diff_of(path: str, value: Any) -> SpecDiff:
    return diff_specs(parse_spec(BASE), parse_spec(changed(path, value)))


HOT = [
    ("training.lr", 3e-4, "lr"),
    ("training.betas", [0.8, 0.99], "betas"),
    ("training.weightDecay", 0.1, "weight_decay"),
    ("training.scale", 2.0, "scale"),
    ("training.clipGradNorm", 0.5, "clip_grad_norm"),
    ("training.maxTokensPerStep", 1024, "max_tokens_per_step"),
    ("training.gradAccumulation", 4, "grad_accumulation"),
    ("training.paused", True, "paused"),
    ("training.prefixCache", "keep", "prefix_cache"),
    ("training.protection", {"maxDutyCycle": 0.5}, "protection"),
    ("checkpoint.intervalSeconds", 60, "checkpoint_interval_s"),
    ("checkpoint.keep", 10, "checkpoint_keep"),
]
STATE_RESET = [
    ("training.optimizer", "adamw", "optimizer"),
    ("training.rank", 128, "rank"),
    ("training.scaleType", "tensor", "scale_type"),
    ("training.updateProjGap", 50, "update_proj_gap"),
    ("training.rounding", "kahan", "rounding"),
]
RESTART = [
    ("model.path", "/models/other", "spec.model.path"),
    ("model.claimName", "models", "spec.model.claimName"),
    ("images.vllm", "reg/vllm:2", "spec.images.vllm"),
    ("images.trainer", "reg/trainer:2", "spec.images.trainer"),
    ("vllm.args", ["--max-model-len", "2048"], "spec.vllm.args"),
    ("vllm.resources", {"limits": {"memory": "64Gi"}}, "spec.vllm.resources.limits"),
    ("trainer.resources", {"requests": {"cpu": "2"}}, "spec.trainer.resources.requests"),
    ("gpu.count", 0, "spec.gpu.count"),
    ("gpu.resourceName", "nvidia.com/mig-1g.10gb", "spec.gpu.resourceName"),
    ("gpu.mps", {"trainerSharePercent": 70}, "spec.gpu.mps"),
    ("auth.curveSecretRef", {"name": "keys"}, "spec.auth.curveSecretRef.name"),
    ("metrics.enabled", False, "spec.metrics.enabled"),
    ("pod.nodeSelector", {"gpu": "h200"}, "spec.pod.nodeSelector"),
    ("pod.terminationGracePeriodSeconds", 900, "spec.pod.terminationGracePeriodSeconds"),
]


@pytest.mark.parametrize(("path", "value", "field"), HOT, ids=[h[0] for h in HOT])
def test_hot_change_relays_without_restart_or_reset(path: str, value: Any, field: str) -> None:
    diff = diff_of(path, value)
    assert set(diff.hot) == {field}
    assert diff.state_reset == frozenset()
    assert not diff.restart_required


@pytest.mark.parametrize(("path", "value", "field"), STATE_RESET, ids=[s[0] for s in STATE_RESET])
def test_optimizer_shape_change_is_hot_but_resets_state(path: str, value: Any, field: str) -> None:
    diff = diff_of(path, value)
    assert set(diff.hot) == {field}
    assert diff.state_reset == {field}
    assert not diff.restart_required


@pytest.mark.parametrize(("path", "value", "cr_path"), RESTART, ids=[r[0] for r in RESTART])
def test_restart_change_names_its_field_and_relays_nothing(path: str, value: Any, cr_path: str) -> None:
    diff = diff_of(path, value)
    assert diff.restart == (cr_path,)
    assert not diff.hot


@pytest.mark.parametrize(
    ("before", "after"),
    [({"trainerSharePercent": 70}, {"trainerSharePercent": 50}), ({"trainerSharePercent": 70}, None)],
    ids=["share-changed", "mps-removed"],
)
def test_mps_change_restarts_the_pod(before: Any, after: Any) -> None:
    old, new = changed("gpu.mps", before), changed("gpu.mps", after)
    diff = diff_specs(parse_spec(old), parse_spec(new))
    assert diff.restart == ("spec.gpu.mps",) and not diff.hot
    assert pod_hash(old) != pod_hash(new)


def test_checkpoint_timeout_is_the_operators_alone() -> None:
    diff = diff_of("checkpoint.timeoutSeconds", 30)
    assert diff.operator == ("spec.checkpoint.timeoutSeconds",)
    assert not diff.hot and not diff.restart


def test_identical_specs_differ_in_nothing() -> None:
    diff = diff_specs(parse_spec(BASE), parse_spec(copy.deepcopy(BASE)))
    assert diff.empty


def pod_hash(spec: dict[str, Any]) -> str:
    pod = pod_builder.build_pod(SESSION, parse_spec(spec))
    return str(pod["metadata"]["annotations"][pod_builder.POD_HASH_ANNOTATION])


@pytest.mark.parametrize(
    ("path", "value"), [(p, v) for p, v, _ in HOT + STATE_RESET], ids=[h[0] for h in HOT + STATE_RESET]
)
def test_hot_change_leaves_the_pod_alone(path: str, value: Any) -> None:
    assert pod_hash(changed(path, value)) == pod_hash(BASE)


@pytest.mark.parametrize(("path", "value"), [(p, v) for p, v, _ in RESTART], ids=[r[0] for r in RESTART])
def test_restart_change_changes_the_pod(path: str, value: Any) -> None:
    assert pod_hash(changed(path, value)) != pod_hash(BASE)


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        (None, set(config_to_dict(TrainingConfig()))),
        ({}, set(config_to_dict(TrainingConfig()))),
        (config_to_dict(TrainingConfig()), set()),
        ({**config_to_dict(TrainingConfig()), "lr": 0.5}, {"lr"}),
        ({**config_to_dict(TrainingConfig()), "betas": [0.9, 0.5]}, {"betas"}),
        ({**config_to_dict(TrainingConfig()), "protection": {"max_duty_cycle": 0.5}}, {"protection"}),
        ({**config_to_dict(TrainingConfig()), "unknown_to_us": 1}, set()),
    ],
    ids=["no-config", "empty", "equal", "lr-differs", "betas-differ", "protection-differs", "extra-field"],
)
def test_config_changes_send_what_the_worker_does_not_report(reported: Any, expected: set[str]) -> None:
    assert set(config_changes(TrainingConfig(), reported)) == expected


def test_a_diff_lists_restart_hot_and_reset_fields() -> None:
    diff = diff_specs(
        parse_spec(BASE), parse_spec({**changed("training.rank", 8), "images": {"vllm": "reg/v:2"}})
    )
    assert (diff.restart, set(diff.hot), diff.state_reset) == (("spec.images.vllm",), {"rank"}, {"rank"})


@pytest.mark.parametrize(
    ("built_from", "now", "reason"),
    [
        (BASE, {**BASE, "images": {"vllm": "reg/v:2"}}, "spec.images.vllm changed"),
        (BASE, changed("gpu.count", 0), "spec.gpu.count changed"),
        (BASE, {**changed("training.lr", 0.01), "images": {"vllm": "reg/v:2"}}, "spec.images.vllm changed"),
        (None, BASE, "the spec changed"),
        ({"model": {}}, BASE, "the spec changed"),
    ],
    ids=["image", "gpu", "hot-fields-left-out", "pod-records-nothing", "recorded-spec-invalid"],
)
def test_restart_reason_names_the_fields_that_replaced_the_pod(
    built_from: dict[str, Any] | None, now: dict[str, Any], reason: str
) -> None:
    assert restart_reason(built_from, parse_spec(now), Images()) == reason


def test_recorded_spec_stays_out_of_the_pod_hash() -> None:
    pod = pod_builder.build_pod(SESSION, parse_spec(BASE))
    recorded = pod_builder.record_built_from(copy.deepcopy(pod), changed("training.lr", 0.01))
    assert pod_builder.pod_hash(recorded) == pod_builder.pod_hash(pod), (
        "a hot change must not replace the pod"
    )
