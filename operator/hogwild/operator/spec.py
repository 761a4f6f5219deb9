"""Parse a TrainingSession's `spec` into frozen dataclasses, filling every default.

The API server applies the CRD's defaults and rules, but the operator must not depend on that (an older
CRD, an emulator, a hand-edited object), so this module defaults and checks everything it reads, with the
same defaults as the CRD (a test keeps them equal). The training hyperparameters map the CR's camelCase
onto `hogwild.config`'s snake_case and go through `hogwild.config`'s own validation. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hogwild.config import ConfigError, TrainingConfig, config_from_dict

GPU_SHARING = ("DevicePlugin", "DRA")
RESTORE_POLICIES = ("Newest", "Base")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
DEFAULT_VLLM_IMAGE = "ghcr.io/hogwild-dev/hogwild-vllm:0.1.0"
DEFAULT_TRAINER_IMAGE = "ghcr.io/hogwild-dev/hogwild-trainer:0.1.0"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_STORAGE_SIZE = "20Gi"
DEFAULT_CHECKPOINT_TIMEOUT_S = 300.0
DEFAULT_GRACE_PERIOD_S = 360
# vLLM flags the launcher sets itself, and the tensor-parallel flags v1alpha1 refuses (one GPU per session).
RESERVED_VLLM_FLAGS = ("--model", "--host", "--port", "--worker-extension-cls")
TENSOR_PARALLEL_FLAGS = ("--tensor-parallel-size", "-tp")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_STORAGE_SIZE = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")

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
}
PROTECTION_FIELDS = {
    "maxDutyCycle": "max_duty_cycle",
    "yieldWhenBusy": "yield_when_busy",
    "maxWaitSeconds": "max_wait_s",
}
# spec.checkpoint fields that are hyperparameters of the worker (applied hot).
CHECKPOINT_CONFIG_FIELDS = {"intervalSeconds": "checkpoint_interval_s", "keep": "checkpoint_keep"}


class SpecError(ValueError):
    """The spec cannot be run; the message names the field (`spec.gpu.count: ...`)."""


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
class GpuSpec:
    count: int = 1
    sharing: str = "DevicePlugin"
    resource_name: str = DEFAULT_GPU_RESOURCE
    claim_name: str | None = None
    claim_template_name: str | None = None


@dataclass(frozen=True)
class StorageSpec:
    existing_claim: str | None = None
    storage_class: str | None = None
    size: str = DEFAULT_STORAGE_SIZE
    retain_on_delete: bool = False


@dataclass(frozen=True)
class CheckpointSpec:
    timeout_s: float = DEFAULT_CHECKPOINT_TIMEOUT_S
    storage: StorageSpec = field(default_factory=StorageSpec)


@dataclass(frozen=True)
class AuthSpec:
    token_secret: str | None = None
    token_key: str = "token"
    curve_secret: str | None = None


@dataclass(frozen=True)
class PodSpec:
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    priority_class: str | None = None
    service_account: str | None = None
    grace_period_s: int = DEFAULT_GRACE_PERIOD_S
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)


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


# ---- small typed readers: each error names its field --------------------------------------------------
def _obj(where: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: must be an object, got {type(value).__name__}")
    return value


def _known(where: str, value: Mapping[str, Any], allowed: set[str] | Mapping[str, Any]) -> None:
    unknown = set(value) - set(allowed)
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")


def _str(where: str, value: Any, default: str | None = None, *, required: bool = False) -> Any:
    if value is None:
        if required:
            raise SpecError(f"{where}: required")
        return default
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: must be a non-empty string, got {value!r}")
    return value


def _choice(where: str, value: Any, allowed: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    if value not in allowed:
        raise SpecError(f"{where}: must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _int(where: str, value: Any, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"{where}: must be a whole number from {low} to {high}, got {value!r}")
    return value


def _number(where: str, value: Any, default: float, low: float, high: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise SpecError(f"{where}: must be a number from {low} to {high}, got {value!r}")
    return float(value)


def _bool(where: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(f"{where}: must be true or false, got {value!r}")
    return value


def _str_map(where: str, value: Any) -> dict[str, str]:
    mapping = _obj(where, value)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise SpecError(f"{where}: must map strings to strings")
    return dict(mapping)


def _str_list(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}: must be a list of strings")
    return tuple(value)


def _quantities(where: str, value: Any) -> dict[str, str]:
    out = {}
    for name, quantity in _obj(where, value).items():
        text = (
            str(quantity)
            if isinstance(quantity, int | float) and not isinstance(quantity, bool)
            else quantity
        )
        if not isinstance(text, str) or not _QUANTITY.match(text):
            raise SpecError(f"{where}.{name}: must be a quantity such as 4, 500m or 16Gi, got {quantity!r}")
        out[name] = text
    return out


# ---- sections -----------------------------------------------------------------------------------------
def _model(raw: Any) -> ModelSpec:
    where = "spec.model"
    value = _obj(where, raw)
    if not value:
        raise SpecError(f"{where}: required (the base model's path, and the PVC that holds it if any)")
    _known(where, value, {"path", "claimName", "servedName", "restore"})
    return ModelSpec(
        path=_str(f"{where}.path", value.get("path"), required=True),
        claim_name=_str(f"{where}.claimName", value.get("claimName")),
        served_name=_str(f"{where}.servedName", value.get("servedName")),
        restore=_choice(f"{where}.restore", value.get("restore"), RESTORE_POLICIES, "Newest"),
    )


def _images(raw: Any, defaults: Images) -> Images:
    where = "spec.images"
    value = _obj(where, raw)
    _known(where, value, {"vllm", "trainer", "pullPolicy", "pullSecrets"})
    return Images(
        vllm=_str(f"{where}.vllm", value.get("vllm"), defaults.vllm),
        trainer=_str(f"{where}.trainer", value.get("trainer"), defaults.trainer),
        pull_policy=_choice(
            f"{where}.pullPolicy", value.get("pullPolicy"), PULL_POLICIES, defaults.pull_policy
        ),
        pull_secrets=_str_list(f"{where}.pullSecrets", value.get("pullSecrets")),
    )


def _env(where: str, raw: Any) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SpecError(f"{where}: must be a list of {{name, value}}")
    pairs = []
    for i, item in enumerate(raw):
        entry = _obj(f"{where}[{i}]", item)
        _known(f"{where}[{i}]", entry, {"name", "value"})
        name = _str(f"{where}[{i}].name", entry.get("name"), required=True)
        pairs.append((name, str(entry.get("value", ""))))
    return tuple(pairs)


def _container(where: str, raw: Any, *, with_args: bool) -> ContainerSpec:
    value = _obj(where, raw)
    _known(where, value, {"resources", "env", "args"} if with_args else {"resources", "env"})
    resources = _obj(f"{where}.resources", value.get("resources"))
    _known(f"{where}.resources", resources, {"requests", "limits"})
    requests = _quantities(f"{where}.resources.requests", resources.get("requests"))
    limits = _quantities(f"{where}.resources.limits", resources.get("limits"))
    if any("gpu" in name for name in (*requests, *limits)):
        raise SpecError(f"{where}.resources: request GPUs with spec.gpu, not in container resources")
    args = _str_list(f"{where}.args", value.get("args"))
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
    value = _obj(where, raw)
    _known(where, value, {"count", "sharing", "resourceName", "claim"})
    count = _int(f"{where}.count", value.get("count"), 1, 0, 1_000_000)
    if count > 1:
        raise SpecError(
            f"{where}.count: v1alpha1 supports one GPU per session (tensor parallel 1); got {count}. "
            "Use 1, or 0 for a CPU-only session."
        )
    sharing = _choice(f"{where}.sharing", value.get("sharing"), GPU_SHARING, "DevicePlugin")
    claim = _obj(f"{where}.claim", value.get("claim"))
    _known(f"{where}.claim", claim, {"resourceClaimName", "resourceClaimTemplateName"})
    claim_name = _str(f"{where}.claim.resourceClaimName", claim.get("resourceClaimName"))
    template = _str(f"{where}.claim.resourceClaimTemplateName", claim.get("resourceClaimTemplateName"))
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
        resource_name=_str(f"{where}.resourceName", value.get("resourceName"), DEFAULT_GPU_RESOURCE),
        claim_name=claim_name,
        claim_template_name=template,
    )


def training_changes(training: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The CR's hyperparameters renamed to `hogwild.config` names (only those present)."""
    changes: dict[str, Any] = {}
    for camel, snake in TRAINING_FIELDS.items():
        if camel in training and training[camel] is not None:
            changes[snake] = training[camel]
    protection = changes.get("protection")
    if isinstance(protection, Mapping):
        _known("spec.training.protection", protection, PROTECTION_FIELDS)
        changes["protection"] = {PROTECTION_FIELDS[k]: v for k, v in protection.items() if v is not None}
    for camel, snake in CHECKPOINT_CONFIG_FIELDS.items():
        if checkpoint.get(camel) is not None:
            changes[snake] = checkpoint[camel]
    return changes


def _training(raw_training: Any, raw_checkpoint: Any) -> TrainingConfig:
    training = _obj("spec.training", raw_training)
    _known("spec.training", training, TRAINING_FIELDS)
    try:
        return config_from_dict(training_changes(training, _obj("spec.checkpoint", raw_checkpoint)))
    except ConfigError as err:
        raise SpecError(f"spec.training: {err}") from None


def _checkpoint(raw: Any) -> CheckpointSpec:
    where = "spec.checkpoint"
    value = _obj(where, raw)
    _known(where, value, {"intervalSeconds", "keep", "timeoutSeconds", "storage"})
    storage = _obj(f"{where}.storage", value.get("storage"))
    _known(f"{where}.storage", storage, {"existingClaim", "storageClassName", "size", "retainOnDelete"})
    existing = _str(f"{where}.storage.existingClaim", storage.get("existingClaim"))
    if existing and (storage.get("storageClassName") or storage.get("size")):
        raise SpecError(f"{where}.storage: existingClaim excludes storageClassName and size")
    size = _str(f"{where}.storage.size", storage.get("size"), DEFAULT_STORAGE_SIZE)
    if not _STORAGE_SIZE.match(size):
        raise SpecError(f"{where}.storage.size: must be a quantity such as 50Gi, got {size!r}")
    return CheckpointSpec(
        timeout_s=_number(
            f"{where}.timeoutSeconds", value.get("timeoutSeconds"), DEFAULT_CHECKPOINT_TIMEOUT_S, 1, 86400
        ),
        storage=StorageSpec(
            existing_claim=existing,
            storage_class=_str(f"{where}.storage.storageClassName", storage.get("storageClassName")),
            size=size,
            retain_on_delete=_bool(f"{where}.storage.retainOnDelete", storage.get("retainOnDelete"), False),
        ),
    )


def _auth(raw: Any) -> AuthSpec:
    where = "spec.auth"
    value = _obj(where, raw)
    _known(where, value, {"tokenSecretRef", "curveSecretRef"})
    token = _obj(f"{where}.tokenSecretRef", value.get("tokenSecretRef"))
    _known(f"{where}.tokenSecretRef", token, {"name", "key"})
    curve = _obj(f"{where}.curveSecretRef", value.get("curveSecretRef"))
    _known(f"{where}.curveSecretRef", curve, {"name"})
    return AuthSpec(
        token_secret=_str(f"{where}.tokenSecretRef.name", token.get("name"), required=bool(token)),
        token_key=_str(f"{where}.tokenSecretRef.key", token.get("key"), "token"),
        curve_secret=_str(f"{where}.curveSecretRef.name", curve.get("name"), required=bool(curve)),
    )


def _pod(raw: Any) -> PodSpec:
    where = "spec.pod"
    value = _obj(where, raw)
    allowed = {
        "nodeSelector",
        "tolerations",
        "priorityClassName",
        "serviceAccountName",
        "terminationGracePeriodSeconds",
        "annotations",
        "labels",
    }
    _known(where, value, allowed)
    tolerations = value.get("tolerations") or []
    if not isinstance(tolerations, list) or not all(isinstance(t, Mapping) for t in tolerations):
        raise SpecError(f"{where}.tolerations: must be a list of tolerations")
    return PodSpec(
        node_selector=_str_map(f"{where}.nodeSelector", value.get("nodeSelector")),
        tolerations=tuple(dict(t) for t in tolerations),
        priority_class=_str(f"{where}.priorityClassName", value.get("priorityClassName")),
        service_account=_str(f"{where}.serviceAccountName", value.get("serviceAccountName")),
        grace_period_s=_int(
            f"{where}.terminationGracePeriodSeconds",
            value.get("terminationGracePeriodSeconds"),
            DEFAULT_GRACE_PERIOD_S,
            30,
            86400,
        ),
        annotations=_str_map(f"{where}.annotations", value.get("annotations")),
        labels=_str_map(f"{where}.labels", value.get("labels")),
    )


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
}


def parse_spec(raw: Any, image_defaults: Images | None = None) -> SessionSpec:
    """The whole spec, defaulted and checked. Raises SpecError naming the first bad field."""
    spec = _obj("spec", raw)
    _known("spec", spec, SPEC_FIELDS)
    metrics = _obj("spec.metrics", spec.get("metrics"))
    _known("spec.metrics", metrics, {"enabled"})
    return SessionSpec(
        model=_model(spec.get("model")),
        images=_images(spec.get("images"), image_defaults or Images()),
        vllm=_container("spec.vllm", spec.get("vllm"), with_args=True),
        trainer=_container("spec.trainer", spec.get("trainer"), with_args=False),
        gpu=_gpu(spec.get("gpu")),
        training=_training(spec.get("training"), spec.get("checkpoint")),
        checkpoint=_checkpoint(spec.get("checkpoint")),
        auth=_auth(spec.get("auth")),
        metrics_enabled=_bool("spec.metrics.enabled", metrics.get("enabled"), True),
        pod=_pod(spec.get("pod")),
    )
