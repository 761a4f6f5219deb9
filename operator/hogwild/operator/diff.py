"""Sort spec changes into hot ones (relayed to the running worker) and restart-requiring ones (docs/design.md).

| kind | fields |
| --- | --- |
| hot | spec.training (all but the four below), spec.checkpoint.intervalSeconds / keep |
| hot, resets optimizer state | optimizer, rank, scaleType, updateProjGap, rounding (hogwild.config) |
| restart (checkpoint, then replace the pod) | model, images, vllm, trainer, gpu, auth, metrics, pod, checkpoint.storage |
| operator only (nothing to send) | checkpoint.timeoutSeconds, replicas (pods added or removed, the others left alone) |

Everything a restart needs lands in the pod (pod_builder.py) and nothing hot does, so "the pod hash changed"
and "diff_specs says restart" agree; a test holds them to it. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hogwild.config import STATE_RESET_FIELDS, TrainingConfig, config_to_dict
from hogwild.operator.spec import Images, SessionSpec, SpecError, parse_spec

# SessionSpec fields -> their CR paths, for sections whose change needs a new pod.
RESTART_SECTIONS = {
    "model": "spec.model",
    "images": "spec.images",
    "vllm": "spec.vllm",
    "trainer": "spec.trainer",
    "gpu": "spec.gpu",
    "auth": "spec.auth",
    "metrics_enabled": "spec.metrics.enabled",
    "pod": "spec.pod",
}
# Leaf names whose CR spelling is not simply camelCase of the dataclass field.
_CR_NAMES = {
    "claim_template_name": "claim.resourceClaimTemplateName",
    "claim_name": "claimName",
    "requests": "resources.requests",
    "limits": "resources.limits",
    "grace_period_s": "terminationGracePeriodSeconds",
    "priority_class": "priorityClassName",
    "service_account": "serviceAccountName",
    "token_secret": "tokenSecretRef.name",
    "token_key": "tokenSecretRef.key",
    "curve_secret": "curveSecretRef.name",
    "storage_class": "storageClassName",
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _leaf(section: str, name: str) -> str:
    if section == "spec.gpu" and name == "claim_name":
        return f"{section}.claim.resourceClaimName"
    return f"{section}.{_CR_NAMES.get(name, _camel(name))}"


def _changed_paths(section: str, old: Any, new: Any) -> list[str]:
    if old == new:
        return []
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new):
        return [
            _leaf(section, f.name)
            for f in dataclasses.fields(old)
            if getattr(old, f.name) != getattr(new, f.name)
        ]
    return [section]


@dataclass(frozen=True)
class SpecDiff:
    """What changed between two specs, by what applying it takes."""

    hot: Mapping[str, Any] = field(default_factory=dict)  # hogwild.config names -> new values
    state_reset: frozenset[str] = frozenset()  # the subset of `hot` that resets optimizer state
    restart: tuple[str, ...] = ()  # CR paths whose change needs a new pod
    operator: tuple[str, ...] = ()  # CR paths only the operator reads

    @property
    def restart_required(self) -> bool:
        return bool(self.restart)

    @property
    def empty(self) -> bool:
        return not (self.hot or self.restart or self.operator)


def config_changes(desired: TrainingConfig, reported: Mapping[str, Any] | None) -> dict[str, Any]:
    """The hyperparameters to send so that the worker's config (as it reported it) equals `desired`.

    Compared in JSON form, as the worker reports it; a field the worker did not report is sent.
    """
    want = config_to_dict(desired)
    have = dict(reported or {})
    return {name: value for name, value in want.items() if have.get(name) != _jsonish(value)}


def _jsonish(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonish(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonish(v) for k, v in value.items()}
    return value


def diff_specs(old: SessionSpec, new: SessionSpec) -> SpecDiff:
    restart: list[str] = []
    for attr, path in RESTART_SECTIONS.items():
        restart += _changed_paths(path, getattr(old, attr), getattr(new, attr))
    if old.checkpoint.storage != new.checkpoint.storage:
        restart += _changed_paths("spec.checkpoint.storage", old.checkpoint.storage, new.checkpoint.storage)
    operator = (
        ["spec.checkpoint.timeoutSeconds"] if old.checkpoint.timeout_s != new.checkpoint.timeout_s else []
    )
    if old.replicas != new.replicas:  # hogwild.operator.replicas adds or removes pods; no pod is replaced
        operator.append("spec.replicas")
    hot = config_changes(new.training, config_to_dict(old.training))
    return SpecDiff(
        hot=hot,
        state_reset=frozenset(hot) & STATE_RESET_FIELDS,
        restart=tuple(restart),
        operator=tuple(operator),
    )


def restart_reason(built_from: Mapping[str, Any] | None, new: SessionSpec, images: Images) -> str:
    """Why a pod built from the CR spec `built_from` must be replaced for `new`: the fields that changed.

    `built_from` is what the pod records (pod_builder.BUILT_FROM_ANNOTATION); a pod that records nothing, or
    a spec that no longer parses, gives the general reason."""
    if built_from is None:
        return "the spec changed"
    try:
        old = parse_spec(built_from, images)
    except SpecError:
        return "the spec changed"
    changed = diff_specs(old, new).restart
    return f"{', '.join(changed)} changed" if changed else "the spec changed"
