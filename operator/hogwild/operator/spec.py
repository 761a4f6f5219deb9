"""Parse a TrainingSession's `spec` into frozen dataclasses, filling every default.

The API server applies the CRD's defaults and rules, but the operator must not depend on that (an older
CRD, an emulator, a hand-edited object), so this module defaults and checks everything it reads, with the
same defaults as the CRD (a test keeps them equal). The training hyperparameters map the CR's camelCase
onto `hogwild.config`'s snake_case and go through `hogwild.config`'s own validation. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hogwild import mps
from hogwild.config import ConfigError, TrainingConfig, config_from_dict
from hogwild.operator import fields
from hogwild.operator.fields import SpecError as SpecError  # re-exported: parse_spec raises it
from hogwild.operator.safety import ConfigMapRef, RollbackSpec, parse_eval_config_map, parse_rollback
from hogwild.operator.spec_pod import ACCESS_MODES as ACCESS_MODES  # re-exported: the CRD's enum
from hogwild.operator.spec_pod import (
    AuthSpec,
    CheckpointSpec,
    PodSpec,
    parse_auth,
    parse_checkpoint,
    parse_pod,
)

GPU_SHARING = ("DevicePlugin", "DRA")
RESTORE_POLICIES = ("Newest", "Base")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
DEFAULT_VLLM_IMAGE = "ghcr.io/hogwild-dev/hogwild-vllm:0.1.0"
DEFAULT_TRAINER_IMAGE = "ghcr.io/hogwild-dev/hogwild-trainer:0.1.0"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
# spec.replicas: pods that serve and learn together (docs/replicas-operator.md). The ceiling keeps one
# session's fan-out (status entries, relays per reconcile, the group's all-reduce) within reason.
MAX_REPLICAS = 64
# vLLM flags the launcher sets itself, and the tensor-parallel flags v1alpha1 refuses (one GPU per session).
RESERVED_VLLM_FLAGS = ("--model", "--host", "--port", "--worker-extension-cls")
TENSOR_PARALLEL_FLAGS = ("--tensor-parallel-size", "-tp")

# CR camelCase -> hogwild.config snake_case, for spec.training (and protection inside it).
TRAINING_FIELDS = {
    "optimizer": "optimizer",
    "lr": "lr",
    "betas": "betas",
    "eps": "eps",
    "weightDecay": "weight_decay",
    "rank": "rank",
    "scaleType": "scale_type",
    "updateProjGap": "update_proj_gap",
    "scale": "scale",
    "rounding": "rounding",
    "clipGradNorm": "clip_grad_norm",
    "maxTokensPerStep": "max_tokens_per_step",
    "gradAccumulation": "grad_accumulation",
    "paused": "paused",
    "prefixCache": "prefix_cache",
    "protection": "protection",
    "snapshots": "snapshots",
    "gate": "gate",
}
# spec.training.gate -> hogwild.config.EvalGate; evalConfigMap is the operator's (hogwild.operator.safety).
GATE_FIELDS = {
    "maxLossRise": "max_loss_rise",
    "maxLossRiseRatio": "max_loss_rise_ratio",
    "evalFile": "eval_file",
}
PROTECTION_FIELDS = {
    "maxDutyCycle": "max_duty_cycle",
    "yieldWhenBusy": "yield_when_busy",
    "maxWaitSeconds": "max_wait_s",
    "minTrainingShare": "min_training_share",
    "gpuWait": "gpu_wait",
}
# spec.checkpoint fields that are hyperparameters of the worker (applied hot).
CHECKPOINT_CONFIG_FIELDS = {"intervalSeconds": "checkpoint_interval_s", "keep": "checkpoint_keep"}


@dataclass(frozen=True)
class ModelSpec:
    path: str
    claim_name: str | None = None
    served_name: str | None = None
    restore: str = "Newest"


@dataclass(frozen=True)
class Images:
    vllm: str = DEFAULT_VLLM_IMAGE
    trainer: str = DEFAULT_TRAINER_IMAGE
    pull_policy: str = "IfNotPresent"
    pull_secrets: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerSpec:
    """Resources (quantities as strings) and extra environment of one container."""

    requests: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, str] = field(default_factory=dict)
    env: tuple[tuple[str, str], ...] = ()
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class MpsSpec:
    """spec.gpu.mps: both processes become clients of one NVIDIA MPS server (hogwild.mps)."""

    trainer_share_percent: int


@dataclass(frozen=True)
class GpuSpec:
    count: int = 1
    sharing: str = "DevicePlugin"
    resource_name: str = DEFAULT_GPU_RESOURCE
    claim_name: str | None = None
    claim_template_name: str | None = None
    mps: MpsSpec | None = None  # None: off


@dataclass(frozen=True)
class SessionSpec:
    model: ModelSpec
    images: Images = field(default_factory=Images)
    vllm: ContainerSpec = field(default_factory=ContainerSpec)
    trainer: ContainerSpec = field(default_factory=ContainerSpec)
    gpu: GpuSpec = field(default_factory=GpuSpec)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    auth: AuthSpec = field(default_factory=AuthSpec)
    metrics_enabled: bool = True
    pod: PodSpec = field(default_factory=PodSpec)
    rollback: RollbackSpec | None = None  # one-shot, by id (hogwild.operator.safety)
    eval_config_map: ConfigMapRef | None = None  # the gate's evaluation set, relayed by the operator
    replicas: int = 1  # hot: pods are added or removed, the others are left alone


# ---- sections -----------------------------------------------------------------------------------------
def _model(raw: Any) -> ModelSpec:
    where = "spec.model"
    value = fields.obj(where, raw)
    if not value:
        raise SpecError(f"{where}: required (the base model's path, and the PVC that holds it if any)")
    fields.known(where, value, {"path", "claimName", "servedName", "restore"})
    return ModelSpec(
        path=fields.string(f"{where}.path", value.get("path"), required=True),
        claim_name=fields.string(f"{where}.claimName", value.get("claimName")),
        served_name=fields.string(f"{where}.servedName", value.get("servedName")),
        restore=fields.choice(f"{where}.restore", value.get("restore"), RESTORE_POLICIES, "Newest"),
    )


def _images(raw: Any, defaults: Images) -> Images:
    where = "spec.images"
    value = fields.obj(where, raw)
    fields.known(where, value, {"vllm", "trainer", "pullPolicy", "pullSecrets"})
    return Images(
        vllm=fields.string(f"{where}.vllm", value.get("vllm"), defaults.vllm),
        trainer=fields.string(f"{where}.trainer", value.get("trainer"), defaults.trainer),
        pull_policy=fields.choice(
            f"{where}.pullPolicy", value.get("pullPolicy"), PULL_POLICIES, defaults.pull_policy
        ),
        pull_secrets=fields.str_list(f"{where}.pullSecrets", value.get("pullSecrets")),
    )


def _env(where: str, raw: Any) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SpecError(f"{where}: must be a list of {{name, value}}")
    pairs = []
    for i, item in enumerate(raw):
        entry = fields.obj(f"{where}[{i}]", item)
        fields.known(f"{where}[{i}]", entry, {"name", "value"})
        name = fields.string(f"{where}[{i}].name", entry.get("name"), required=True)
        pairs.append((name, str(entry.get("value", ""))))
    return tuple(pairs)


def _container(where: str, raw: Any, *, with_args: bool) -> ContainerSpec:
    value = fields.obj(where, raw)
    fields.known(where, value, {"resources", "env", "args"} if with_args else {"resources", "env"})
    resources = fields.obj(f"{where}.resources", value.get("resources"))
    fields.known(f"{where}.resources", resources, {"requests", "limits"})
    requests = fields.quantities(f"{where}.resources.requests", resources.get("requests"))
    limits = fields.quantities(f"{where}.resources.limits", resources.get("limits"))
    if any("gpu" in name for name in (*requests, *limits)):
        raise SpecError(f"{where}.resources: request GPUs with spec.gpu, not in container resources")
    args = fields.str_list(f"{where}.args", value.get("args"))
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_VLLM_FLAGS:
            raise SpecError(f"{where}.args: {flag} is set by hogwild (use spec.model); remove it")
        if flag in TENSOR_PARALLEL_FLAGS:
            raise SpecError(f"{where}.args: v1alpha1 runs one GPU per session; remove {flag}")
    return ContainerSpec(
        requests=requests, limits=limits, env=_env(f"{where}.env", value.get("env")), args=args
    )


def _gpu(raw: Any) -> GpuSpec:
    where = "spec.gpu"
    value = fields.obj(where, raw)
    fields.known(where, value, {"count", "sharing", "resourceName", "claim", "mps"})
    count = fields.whole_number(f"{where}.count", value.get("count"), 1, 0, 1_000_000)
    if count > 1:
        raise SpecError(
            f"{where}.count: v1alpha1 supports one GPU per session (tensor parallel 1); got {count}. "
            "Use 1, or 0 for a CPU-only session."
        )
    sharing = fields.choice(f"{where}.sharing", value.get("sharing"), GPU_SHARING, "DevicePlugin")
    claim = fields.obj(f"{where}.claim", value.get("claim"))
    fields.known(f"{where}.claim", claim, {"resourceClaimName", "resourceClaimTemplateName"})
    claim_name = fields.string(f"{where}.claim.resourceClaimName", claim.get("resourceClaimName"))
    template = fields.string(
        f"{where}.claim.resourceClaimTemplateName", claim.get("resourceClaimTemplateName")
    )
    if claim and sharing != "DRA":
        raise SpecError(f"{where}.claim: only used with sharing: DRA")
    if claim and (claim_name is None) == (template is None):
        raise SpecError(f"{where}.claim: set exactly one of resourceClaimName and resourceClaimTemplateName")
    if count and sharing == "DRA" and not claim:
        raise SpecError(
            f"{where}: sharing DRA needs claim.resourceClaimName or claim.resourceClaimTemplateName"
        )
    return GpuSpec(
        count=count,
        sharing=sharing,
        resource_name=fields.string(f"{where}.resourceName", value.get("resourceName"), DEFAULT_GPU_RESOURCE),
        claim_name=claim_name,
        claim_template_name=template,
        mps=_mps(value.get("mps"), count),
    )


def _mps(raw: Any, gpu_count: int) -> MpsSpec | None:
    where = "spec.gpu.mps"
    if raw is None:
        return None
    value = fields.obj(where, raw)
    fields.known(where, value, {"trainerSharePercent"})
    if "trainerSharePercent" not in value:
        raise SpecError(f"{where}.trainerSharePercent: required (the trainer's share of the SMs, e.g. 70)")
    if gpu_count == 0:
        raise SpecError(f"{where}: needs a GPU; remove it, or set gpu.count to 1")
    try:
        share = mps.check_share(value["trainerSharePercent"])
    except ValueError as err:
        raise SpecError(f"{where}.trainerSharePercent: {err}") from None
    return MpsSpec(trainer_share_percent=share)


def training_changes(training: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The CR's hyperparameters renamed to `hogwild.config` names (only those present)."""
    changes: dict[str, Any] = {}
    for camel, snake in TRAINING_FIELDS.items():
        if camel in training and training[camel] is not None:
            changes[snake] = training[camel]
    protection = changes.get("protection")
    if isinstance(protection, Mapping):
        fields.known("spec.training.protection", protection, PROTECTION_FIELDS)
        changes["protection"] = {PROTECTION_FIELDS[k]: v for k, v in protection.items() if v is not None}
    gate = changes.get("gate")
    if isinstance(gate, Mapping):
        fields.known("spec.training.gate", gate, {*GATE_FIELDS, "evalConfigMap"})
        changes["gate"] = {GATE_FIELDS[k]: v for k, v in gate.items() if k in GATE_FIELDS and v is not None}
    for camel, snake in CHECKPOINT_CONFIG_FIELDS.items():
        if checkpoint.get(camel) is not None:
            changes[snake] = checkpoint[camel]
    return changes


def _training(raw_training: Any, raw_checkpoint: Any) -> TrainingConfig:
    training = fields.obj("spec.training", raw_training)
    fields.known("spec.training", training, TRAINING_FIELDS)
    try:
        return config_from_dict(training_changes(training, fields.obj("spec.checkpoint", raw_checkpoint)))
    except ConfigError as err:
        raise SpecError(f"spec.training: {err}") from None


SPEC_FIELDS = {
    "model",
    "images",
    "vllm",
    "trainer",
    "gpu",
    "training",
    "checkpoint",
    "auth",
    "metrics",
    "pod",
    "rollback",
    "replicas",
}


def parse_spec(raw: Any, image_defaults: Images | None = None) -> SessionSpec:
    """The whole spec, defaulted and checked. Raises SpecError naming the first bad field."""
    spec = fields.obj("spec", raw)
    fields.known("spec", spec, SPEC_FIELDS)
    metrics = fields.obj("spec.metrics", spec.get("metrics"))
    fields.known("spec.metrics", metrics, {"enabled"})
    return SessionSpec(
        model=_model(spec.get("model")),
        images=_images(spec.get("images"), image_defaults or Images()),
        vllm=_container("spec.vllm", spec.get("vllm"), with_args=True),
        trainer=_container("spec.trainer", spec.get("trainer"), with_args=False),
        gpu=_gpu(spec.get("gpu")),
        training=_training(spec.get("training"), spec.get("checkpoint")),
        checkpoint=parse_checkpoint(spec.get("checkpoint")),
        auth=parse_auth(spec.get("auth")),
        metrics_enabled=fields.flag("spec.metrics.enabled", metrics.get("enabled"), True),
        pod=parse_pod(spec.get("pod")),
        rollback=parse_rollback(spec.get("rollback")),
        eval_config_map=parse_eval_config_map(fields.obj("spec.training", spec.get("training")).get("gate")),
        replicas=_replicas(spec.get("replicas"), spec.get("checkpoint")),
    )


def _replicas(raw: Any, raw_checkpoint: Any) -> int:
    replicas = fields.whole_number("spec.replicas", raw, 1, 1, MAX_REPLICAS)
    storage = fields.obj(
        "spec.checkpoint.storage", fields.obj("spec.checkpoint", raw_checkpoint).get("storage")
    )
    if replicas > 1 and storage.get("accessMode") == "ReadWriteOncePod":
        raise SpecError(
            "spec.replicas: above 1 needs a checkpoint volume several pods can mount; "
            "checkpoint.storage.accessMode ReadWriteOncePod allows one"
        )
    return replicas
