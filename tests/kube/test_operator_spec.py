"""Parsing a TrainingSession spec without the API server's help: defaults, renames, and errors naming the field.

The CRD refuses most of these at admission; the operator refuses them again, because an object can reach it
without that admission (an older CRD, an emulator, a hand edit): then the session goes Failed with this text.
"""

from __future__ import annotations

from typing import Any

import pytest

from hogwild.config import ServingProtection, TrainingConfig
from hogwild.operator.main import options_from_args, parse_args, run_arguments
from hogwild.operator.spec import Images, MpsSpec, SessionSpec, SpecError, parse_spec, training_changes

MODEL = {"model": {"path": "/models/m"}}


def test_minimal_spec_gets_every_default() -> None:
    spec = parse_spec(MODEL)
    assert spec == SessionSpec(model=spec.model)
    assert (spec.training.optimizer, spec.training.rank) == ("apollo", 64)
    assert (spec.gpu.count, spec.gpu.sharing) == (1, "DevicePlugin")
    assert (spec.replicas, spec.checkpoint.storage.access_mode) == (1, "ReadWriteOnce")


@pytest.mark.parametrize(("replicas", "expected"), [(None, 1), (1, 1), (2, 2), (64, 64)])
def test_replicas(replicas: int | None, expected: int) -> None:
    assert parse_spec({**MODEL, "replicas": replicas}).replicas == expected


def test_camel_case_hyperparameters_map_onto_the_config_names() -> None:
    training = {
        "optimizer": "adamw",
        "weightDecay": 0.1,
        "scaleType": "tensor",
        "updateProjGap": 10,
        "clipGradNorm": 0.5,
        "maxTokensPerStep": 128,
        "gradAccumulation": 4,
        "prefixCache": "keep",
        "protection": {"maxDutyCycle": 0.5, "yieldWhenBusy": True, "maxWaitSeconds": 3},
    }
    spec = parse_spec({**MODEL, "training": training, "checkpoint": {"intervalSeconds": 30, "keep": 7}})
    assert spec.training == TrainingConfig(
        optimizer="adamw",
        weight_decay=0.1,
        scale_type="tensor",
        update_proj_gap=10,
        clip_grad_norm=0.5,
        max_tokens_per_step=128,
        grad_accumulation=4,
        prefix_cache="keep",
        protection=ServingProtection(max_duty_cycle=0.5, yield_when_busy=True, max_wait_s=3.0),
        checkpoint_interval_s=30.0,
        checkpoint_keep=7,
    )


@pytest.mark.parametrize(
    ("gpu", "expected"),
    [
        ({}, None),
        ({"mps": None}, None),
        ({"mps": {"trainerSharePercent": 70}}, MpsSpec(trainer_share_percent=70)),
        ({"mps": {"trainerSharePercent": 1}}, MpsSpec(trainer_share_percent=1)),
        (
            {"mps": {"trainerSharePercent": 100}, "sharing": "DRA", "claim": {"resourceClaimName": "g"}},
            MpsSpec(100),
        ),
    ],
    ids=["absent-is-off", "null-is-off", "seventy", "min", "max-with-dra"],
)
def test_gpu_mps(gpu: dict[str, Any], expected: MpsSpec | None) -> None:
    assert parse_spec({**MODEL, "gpu": gpu}).gpu.mps == expected


def test_training_changes_keep_only_what_is_set() -> None:
    assert training_changes({"lr": 0.1, "rank": None}, {"keep": 2}) == {"lr": 0.1, "checkpoint_keep": 2}


def test_operator_image_defaults_fill_unset_images() -> None:
    spec = parse_spec(
        {**MODEL, "images": {"trainer": "mine:1"}}, Images(vllm="ours-vllm:9", trainer="ours-trainer:9")
    )
    assert (spec.images.vllm, spec.images.trainer) == ("ours-vllm:9", "mine:1")


ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("no-model", {}, "spec.model: required"),
    ("no-model-path", {"model": {"claimName": "x"}}, "spec.model.path: required"),
    ("unknown-top-field", {**MODEL, "shards": 2}, "spec: unknown field(s) shards"),
    ("replicas-zero", {**MODEL, "replicas": 0}, "spec.replicas: must be a whole number from 1 to 64"),
    ("replicas-too-many", {**MODEL, "replicas": 65}, "spec.replicas: must be a whole number from 1 to 64"),
    ("replicas-text", {**MODEL, "replicas": "2"}, "spec.replicas: must be a whole number from 1 to 64"),
    (
        "replicas-with-read-write-once-pod",
        {**MODEL, "replicas": 2, "checkpoint": {"storage": {"accessMode": "ReadWriteOncePod"}}},
        "spec.replicas: above 1 needs a checkpoint volume several pods can mount",
    ),
    (
        "claim-and-access-mode",
        {**MODEL, "checkpoint": {"storage": {"existingClaim": "c", "accessMode": "ReadWriteMany"}}},
        "existingClaim excludes accessMode",
    ),
    (
        "access-mode-unknown",
        {**MODEL, "checkpoint": {"storage": {"accessMode": "ReadMany"}}},
        "spec.checkpoint.storage.accessMode: must be one of ReadWriteOnce, ReadWriteMany, ReadWriteOncePod",
    ),
    ("two-gpus", {**MODEL, "gpu": {"count": 2}}, "spec.gpu.count: v1alpha1 supports one GPU per session"),
    ("dra-no-claim", {**MODEL, "gpu": {"sharing": "DRA"}}, "spec.gpu: sharing DRA needs claim"),
    (
        "claim-both",
        {
            **MODEL,
            "gpu": {"sharing": "DRA", "claim": {"resourceClaimName": "a", "resourceClaimTemplateName": "b"}},
        },
        "set exactly one of resourceClaimName and resourceClaimTemplateName",
    ),
    (
        "claim-device-plugin",
        {**MODEL, "gpu": {"claim": {"resourceClaimName": "a"}}},
        "only used with sharing: DRA",
    ),
    (
        "mps-share-zero",
        {**MODEL, "gpu": {"mps": {"trainerSharePercent": 0}}},
        "spec.gpu.mps.trainerSharePercent: must be a whole number from 1 to 100",
    ),
    (
        "mps-share-101",
        {**MODEL, "gpu": {"mps": {"trainerSharePercent": 101}}},
        "spec.gpu.mps.trainerSharePercent: must be a whole number from 1 to 100",
    ),
    (
        "mps-share-fraction",
        {**MODEL, "gpu": {"mps": {"trainerSharePercent": 70.5}}},
        "spec.gpu.mps.trainerSharePercent: must be a whole number from 1 to 100",
    ),
    (
        "mps-share-string",
        {**MODEL, "gpu": {"mps": {"trainerSharePercent": "70%"}}},
        "got '70%'",
    ),
    ("mps-no-share", {**MODEL, "gpu": {"mps": {}}}, "spec.gpu.mps.trainerSharePercent: required"),
    ("mps-unknown", {**MODEL, "gpu": {"mps": {"share": 70}}}, "spec.gpu.mps: unknown field(s) share"),
    (
        "mps-cpu",
        {**MODEL, "gpu": {"count": 0, "mps": {"trainerSharePercent": 70}}},
        "spec.gpu.mps: needs a GPU",
    ),
    ("bad-optimizer", {**MODEL, "training": {"optimizer": "sgd"}}, "spec.training: optimizer must be one of"),
    ("bad-lr", {**MODEL, "training": {"lr": 5}}, "spec.training: lr must be between"),
    (
        "bad-protection",
        {**MODEL, "training": {"protection": {"cap": 1}}},
        "spec.training.protection: unknown field(s) cap",
    ),
    (
        "tp-flag",
        {**MODEL, "vllm": {"args": ["--tensor-parallel-size=2"]}},
        "v1alpha1 runs one GPU per session",
    ),
    ("reserved-flag", {**MODEL, "vllm": {"args": ["--model", "x"]}}, "--model is set by hogwild"),
    (
        "gpu-in-resources",
        {**MODEL, "vllm": {"resources": {"limits": {"nvidia.com/gpu": 1}}}},
        "request GPUs with spec.gpu",
    ),
    (
        "bad-quantity",
        {**MODEL, "trainer": {"resources": {"requests": {"cpu": "lots"}}}},
        "spec.trainer.resources.requests.cpu",
    ),
    (
        "claim-and-size",
        {**MODEL, "checkpoint": {"storage": {"existingClaim": "c", "size": "1Gi"}}},
        "existingClaim excludes storageClassName and size",
    ),
    (
        "token-ref-no-name",
        {**MODEL, "auth": {"tokenSecretRef": {"key": "k"}}},
        "spec.auth.tokenSecretRef.name: required",
    ),
    (
        "short-grace",
        {**MODEL, "pod": {"terminationGracePeriodSeconds": 1}},
        "spec.pod.terminationGracePeriodSeconds",
    ),
    ("spec-not-object", [], "spec: must be an object"),  # type: ignore[list-item]
]


@pytest.mark.parametrize(("raw", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_spec_is_refused_naming_the_field(raw: Any, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("argv", "interval", "port", "vllm_image"),
    [
        ([], 10.0, 8080, "ghcr.io/hogwild-dev/hogwild-vllm:0.1.0"),
        (["--status-interval", "2", "--metrics-port", "0", "--vllm-image", "r/v:1"], 2.0, None, "r/v:1"),
    ],
    ids=["defaults", "flags"],
)
def test_operator_flags(
    argv: list[str], interval: float, port: int | None, vllm_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOGWILD_VLLM_IMAGE", "")  # set but empty means unset
    options = options_from_args(parse_args(argv))
    assert (options.status_interval_s, options.metrics_port, options.image_defaults.vllm) == (
        interval,
        port,
        vllm_image,
    )
    assert not options.allow_address_override, "only tests redirect the relay"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--standalone", "-A"], {"standalone": True, "peering_name": None, "clusterwide": True}),
        (
            ["--standalone", "-n", "a", "-n", "b"],
            {"standalone": True, "peering_name": None, "namespaces": ["a", "b"]},
        ),
        (["--peering=team", "-A"], {"standalone": False, "peering_name": "team", "clusterwide": True}),
        (["-n", "a"], {"standalone": False, "peering_name": "hogwild", "clusterwide": False}),
    ],
    ids=["standalone-cluster", "standalone-namespaces", "peering-named", "peering-default"],
)
def test_operator_scope_and_peering_reach_kopf(argv: list[str], expected: dict[str, Any]) -> None:
    """A standalone operator must name no peering: kopf makes any named peering mandatory and then pauses."""
    arguments = run_arguments(parse_args(argv))
    assert {key: arguments[key] for key in expected} == expected
