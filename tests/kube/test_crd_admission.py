"""Offline admission of TrainingSessions against the CRD, the way the API server would admit them.

No API server runs here, so this file plays its admission steps in order: structural defaulting from the
schema's `default`s, the OpenAPI schema (with `jsonschema`, unknown fields rejected as `kubectl apply`'s
strict field validation does), then every `x-kubernetes-validations` CEL rule (with `cel-python`).

Two behaviours of a real API server (Kubernetes 1.36) that offline checks used to miss are played too:
- at CRD creation it checks every `default`, as written (nested defaults NOT filled in), against its node's
  schema and CEL rules (`test_every_default_satisfies_the_rules_that_apply_to_it`);
- it compares an integer input with a fractional `minimum`/`maximum` truncated to an integer
  (kube-openapi's `MinimumNativeType`), so `minimum: 0.01` admits `0`. `admission_errors` does the same, and
  the CRD keeps fractional floors in CEL rules, which see doubles.

Limits of the emulation, by design of the rules: `cel-python` has no Kubernetes CEL extensions (no
`quantity`, `url`, string `split`...), so the rules use none; transition rules (`oldSelf`) are evaluated by
binding `oldSelf` ourselves, for the update fixtures whose first document is the stored object (the API
server also skips transition rules on create, as here); the CEL cost budget is not estimated, so every list
a rule walks has maxItems and maxLength. With KUBECONFIG set, the `e2e` test sends the same fixtures to a
real API server (`kubectl apply --dry-run=server`).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from hogwild import config, defaults, mps
from hogwild.config import ConfigError, validate_changes
from hogwild.operator import spec as spec_module
from hogwild.operator.spec import parse_spec
from hogwild.operator.status import PHASES

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "hogwild.dev_trainingsessions.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "tests" / "fixtures" / "invalid").glob("*.yaml"))
EXPECT = "test.hogwild.dev/rejected-with"


def load_crd() -> dict[str, Any]:
    return dict(yaml.safe_load(CRD_PATH.read_text()))


CRD = load_crd()
VERSION = CRD["spec"]["versions"][0]
SCHEMA: dict[str, Any] = VERSION["schema"]["openAPIV3Schema"]


# ---- the admission emulation --------------------------------------------------------------------------
def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting: a missing property with a `default` gets it, recursively (defaults included)."""
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in set(value) - set(schema.get("properties", {})):
                value[name] = apply_defaults(extra, value[name])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def to_jsonschema(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema as JSON Schema: x- keys dropped, unknown fields refused (strict field validation)."""
    out = {
        k: to_jsonschema(v) if isinstance(v, dict) else v for k, v in schema.items() if not k.startswith("x-")
    }
    for key in ("properties",):
        if key in schema:
            out[key] = {name: to_jsonschema(sub) for name, sub in schema[key].items()}
    if "items" in schema:
        out["items"] = to_jsonschema(schema["items"])
    if "anyOf" in schema:
        out["anyOf"] = [to_jsonschema(s) for s in schema["anyOf"]]
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    if (
        schema.get("type") == "object"
        and "properties" in schema
        and "additionalProperties" not in schema
        and not preserve
    ):
        out["additionalProperties"] = False
    return out


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _native_bound(bound: float, instance: Any) -> float:
    """The bound the API server really compares with: truncated to an integer for integer input."""
    return float(int(bound)) if _is_integer(instance) else bound


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _minimum(validator: Any, minimum: float, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if _is_number(instance) and instance < _native_bound(minimum, instance):
        yield jsonschema.ValidationError(f"{instance!r} is less than the minimum of {minimum!r}")


def _maximum(validator: Any, maximum: float, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if _is_number(instance) and instance > _native_bound(maximum, instance):
        yield jsonschema.ValidationError(f"{instance!r} is greater than the maximum of {maximum!r}")


# Draft 7 with the API server's numeric comparisons (see the module docstring).
KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"minimum": _minimum, "maximum": _maximum}
)


def _cel_value(schema: dict[str, Any], value: Any) -> Any:
    """Numbers of `type: number` fields are doubles in Kubernetes CEL, even when written as 1."""
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        return {
            k: _cel_value(props.get(k, extra if isinstance(extra, dict) else {}), v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_cel_value(schema.get("items", {}), v) for v in value]
    return value


def cel_errors(schema: dict[str, Any], value: Any, old: Any, path: str) -> Iterator[str]:
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue  # transition rules run on updates only
        activation = {"self": celpy.json_to_cel(_cel_value(schema, value))}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(_cel_value(schema, old))
        try:
            ok = env.program(env.compile(rule["rule"])).evaluate(activation)
        except celpy.CELEvalError as err:
            ok, detail = False, f" ({err.args[0]})"
        else:
            detail = ""
        if not ok:
            yield f"{path or '<root>'}: Invalid value: {rule.get('message', 'failed rule: ' + rule['rule'])}{detail}"
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                prior = old.get(name) if isinstance(old, dict) else None
                yield from cel_errors(sub, value[name], prior, f"{path}.{name}".lstrip("."))
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from cel_errors(schema["items"], item, None, f"{path}[{i}]")


def admission_errors(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Every reason the API server would refuse `obj` (an update of `old`); [] when admitted."""
    obj = apply_defaults(SCHEMA, copy.deepcopy(obj))
    old = apply_defaults(SCHEMA, copy.deepcopy(old)) if old is not None else None
    validator = KubeValidator(to_jsonschema(SCHEMA))
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)
    ]
    if errors:  # the API server stops at schema errors; CEL never sees a malformed object
        return errors
    return list(cel_errors(SCHEMA, obj, old, ""))


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ---- the CRD itself -----------------------------------------------------------------------------------
def test_crd_is_a_valid_custom_resource_definition() -> None:
    kubernetes_validate.validate(load_crd(), "1.37.0", strict=True)


def test_crd_names() -> None:
    spec = CRD["spec"]
    assert (spec["group"], VERSION["name"], spec["names"]["kind"]) == (
        defaults.API_GROUP,
        defaults.API_VERSION,
        defaults.KIND,
    )
    assert spec["names"]["plural"] == "trainingsessions"
    assert spec["names"]["shortNames"] == ["ts"]
    assert VERSION["subresources"]["status"] == {}
    assert set(VERSION["subresources"]) == {"status", "scale"}


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    for name, sub in schema.get("properties", {}).items():
        yield f"{path}.{name}", sub
        yield from walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield f"{path}[]", schema["items"]
        yield from walk(schema["items"], f"{path}[]")


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    # Items of a list of scalars are described by the list.
    fields = [
        (p, s)
        for p, s in walk(SCHEMA)
        if p != ".metadata" and not (p.endswith("[]") and s.get("type") != "object")
    ]
    missing = [p for p, sub in fields if not sub.get("description")]
    assert missing == []


def test_schema_is_structural_every_node_has_a_type() -> None:
    untyped = [
        p for p, sub in walk(SCHEMA) if "type" not in sub and not sub.get("x-kubernetes-int-or-string")
    ]
    assert untyped == []


def default_errors(schema: dict[str, Any]) -> list[str]:
    """What the API server checks at CRD creation: each `default` exactly as written (nested defaults are not
    filled in) against its node's schema and every CEL rule of that node and below (transition rules are
    skipped: there is no old object)."""
    errors = []
    for path, node in walk(schema):
        if "default" not in node:
            continue
        value = copy.deepcopy(node["default"])
        validator = KubeValidator(to_jsonschema(node))
        errors += [f"{path}.default: {e.message}" for e in validator.iter_errors(value)]
        errors += [f"{path}.default: {e}" for e in cel_errors(node, value, None, path.lstrip("."))]
    return errors


def test_every_default_satisfies_the_rules_that_apply_to_it() -> None:
    assert default_errors(SCHEMA) == []


@pytest.mark.parametrize(
    ("node", "refused"),
    [
        ({"type": "object", "default": {}, "properties": {"count": {"type": "integer", "default": 1}},
          "x-kubernetes-validations": [{"rule": "self.count <= 1", "message": "one"}]}, True),
        ({"type": "object", "default": {"count": 1}, "properties": {"count": {"type": "integer"}},
          "x-kubernetes-validations": [{"rule": "self.count <= 1", "message": "one"}]}, False),
        ({"type": "object", "default": {}, "properties": {"count": {"type": "integer", "default": 1}},
          "x-kubernetes-validations": [{"rule": "!has(self.count) || self.count <= 1", "message": "one"}]},
         False),
        ({"type": "object", "default": {"count": 2}, "properties": {"count": {"type": "integer"}},
          "x-kubernetes-validations": [{"rule": "self.count <= 1", "message": "one"}]}, True),
        ({"type": "object", "default": {"count": 0}, "properties": {"count": {"type": "integer",
          "minimum": 1}}}, True),
    ],
    ids=["rule-reads-a-nested-default", "default-carries-the-field", "rule-uses-has", "default-breaks-rule",
         "default-breaks-schema"],
)  # fmt: skip
def test_default_check_refuses_what_the_api_server_refuses(node: dict[str, Any], refused: bool) -> None:
    assert bool(default_errors({"type": "object", "properties": {"field": node}})) is refused


def test_no_number_has_a_fractional_floor() -> None:
    """A fractional `minimum` would admit the integer just below it (the API server truncates the bound)."""
    fractional = [
        path
        for path, node in walk(SCHEMA)
        if node.get("type") == "number" and "minimum" in node and node["minimum"] != int(node["minimum"])
    ]
    assert fractional == [], "use `minimum` at an integer and a CEL rule `self >= x` for the real floor"


@pytest.mark.parametrize(
    ("value", "bound", "admitted"),
    [(0, 0.01, True), (0.0, 0.01, False), (0.005, 0.01, False), (1, 0.5, True), (0, 1e-30, True)],
    ids=["integer-zero", "float-zero", "fraction-below", "integer-above", "integer-zero-tiny-floor"],
)
def test_numeric_floors_compare_like_the_api_server(value: float, bound: float, admitted: bool) -> None:
    schema = {"type": "number", "minimum": bound}
    assert KubeValidator(schema).is_valid(value) is admitted


def test_printer_columns() -> None:
    columns = {c["name"]: (c["jsonPath"], c.get("priority", 0)) for c in VERSION["additionalPrinterColumns"]}
    assert {n: c for n, c in columns.items() if c[1] == 0} == {
        "Phase": (".status.phase", 0),
        "Step": (".status.step", 0),
        "Loss": (".status.loss", 0),
        "Ready": (".status.readyReplicas", 0),
        "Desired": (".spec.replicas", 0),
        "In Sync": (".status.inSyncReplicas", 0),
        "Last Checkpoint": (".status.lastCheckpoint.time", 0),
        "Age": (".metadata.creationTimestamp", 0),
    }
    wide = {"Phase", "Step", "Loss", "Ready", "Desired", "In Sync", "Last Checkpoint", "Age"}
    assert {c[1] for n, c in columns.items() if n not in wide} == {1}


def test_scale_subresource_points_at_the_replica_counts() -> None:
    scale = VERSION["subresources"]["scale"]
    assert (scale["specReplicasPath"], scale["statusReplicasPath"]) == (".spec.replicas", ".status.replicas")
    assert prop("spec.replicas")["default"] == 1


@pytest.mark.parametrize(
    ("replicas", "name", "message"),
    [
        (None, "chat", None),
        (1, "chat", None),
        (64, "chat", None),
        (0, "chat", "spec.replicas must be at least 1"),
        (-3, "chat", "spec.replicas must be at least 1"),
        (65, "chat", "65 is greater than the maximum of 64"),
        (2, "c" * 54, None),
        (2, "c" * 55, "metadata.name must be at most 54 characters"),
        (1, "c" * 63, None),
    ],
    ids=["absent", "one", "max", "zero", "negative", "too-many", "name-54", "name-55", "one-long-name"],
)
def test_replicas_admission(replicas: int | None, name: str, message: str | None) -> None:
    spec: dict[str, Any] = {"model": {"path": "/m"}}
    if replicas is not None:
        spec["replicas"] = replicas
    errors = admission_errors({"metadata": {"name": name}, "spec": spec})
    if message is None:
        assert errors == []
        defaulted = apply_defaults(SCHEMA, {"metadata": {"name": name}, "spec": copy.deepcopy(spec)})
        assert parse_spec(defaulted["spec"]).replicas == (replicas or 1)
    else:
        assert any(message in e for e in errors), errors


def prop(path: str) -> dict[str, Any]:
    node = SCHEMA
    for name in path.split("."):
        node = node["properties"][name]
    return node


@pytest.mark.parametrize(
    ("path", "values"),
    [
        ("spec.training.optimizer", config.OPTIMIZERS),
        ("spec.training.scaleType", config.SCALE_TYPES),
        ("spec.training.rounding", config.ROUNDINGS),
        ("spec.training.prefixCache", config.PREFIX_CACHE_POLICIES),
        ("spec.gpu.sharing", spec_module.GPU_SHARING),
        ("spec.model.restore", spec_module.RESTORE_POLICIES),
        ("spec.images.pullPolicy", spec_module.PULL_POLICIES),
        ("spec.checkpoint.storage.accessMode", spec_module.ACCESS_MODES),
        ("status.phase", PHASES),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_enums_match_the_code(path: str, values: tuple[str, ...]) -> None:
    assert tuple(prop(path)["enum"]) == tuple(values)


def test_training_fields_are_exactly_the_ones_the_operator_maps() -> None:
    assert set(prop("spec.training")["properties"]) == set(spec_module.TRAINING_FIELDS)
    assert set(prop("spec.training.protection")["properties"]) == set(spec_module.PROTECTION_FIELDS)


def test_crd_defaults_equal_the_operators_defaults() -> None:
    raw = {"model": {"path": "/models/m"}}
    defaulted = apply_defaults(SCHEMA, {"metadata": {"name": "m"}, "spec": copy.deepcopy(raw)})["spec"]
    assert defaulted["training"]["rank"] == 64 and defaulted["training"]["optimizer"] == "apollo"
    assert parse_spec(defaulted) == parse_spec(raw)


FLOOR_RULE = re.compile(r"^self >= ([-+0-9.eE]+)$")


def bounds_of(node: dict[str, Any]) -> dict[str, float]:
    """A node's `minimum`/`maximum`, with a floor written as a CEL rule `self >= x` taking the minimum's place."""
    bounds = {edge: node[edge] for edge in ("minimum", "maximum") if edge in node}
    for rule in node.get("x-kubernetes-validations", []):
        if match := FLOOR_RULE.match(rule["rule"]):
            bounds["minimum"] = float(match.group(1))
    return bounds


BOUNDS = [
    (f"spec.training.{camel}", snake)
    for camel, snake in spec_module.TRAINING_FIELDS.items()
    if "maximum" in prop(f"spec.training.{camel}") or "minimum" in prop(f"spec.training.{camel}")
] + [(f"spec.checkpoint.{c}", s) for c, s in spec_module.CHECKPOINT_CONFIG_FIELDS.items()]


@pytest.mark.parametrize(("path", "field"), BOUNDS, ids=[b[0] for b in BOUNDS])
def test_crd_bounds_agree_with_the_workers_validation(path: str, field: str) -> None:
    node = prop(path)
    integer = node["type"] == "integer"
    for edge, bound in bounds_of(node).items():
        validate_changes({field: bound})  # the CRD's edge is accepted by the worker
        for beyond in {
            bound + (1 if edge == "maximum" else -1) * (1 if integer else max(abs(bound) * 0.5, 0.01)),
            # the integer just under a fractional floor, which only a CEL rule refuses
            *([int(bound)] if not integer and edge == "minimum" and int(bound) < bound else []),
        }:
            assert admission_errors(
                {"metadata": {"name": "b"}, "spec": {"model": {"path": "/m"}, **nest(path, beyond)}}
            )
            with pytest.raises(ConfigError):
                validate_changes({field: beyond})


def test_mps_share_bounds_agree_with_the_code() -> None:
    node = prop("spec.gpu.mps.trainerSharePercent")
    assert (node["type"], node["minimum"], node["maximum"]) == ("integer", mps.SHARE_MIN, mps.SHARE_MAX)
    assert prop("spec.gpu.mps")["required"] == ["trainerSharePercent"]


@pytest.mark.parametrize(
    ("share", "message"),
    [
        (70, None),
        (1, None),
        (100, None),
        (0, "0 is less than the minimum of 1"),
        (101, "101 is greater than the maximum of 100"),
        (70.5, "70.5 is not of type 'integer'"),
        ("70", "'70' is not of type 'integer'"),
    ],
    ids=["70", "1", "100", "0", "101", "fraction", "string"],
)
def test_mps_share_admission(share: Any, message: str | None) -> None:
    session = {
        "metadata": {"name": "m"},
        "spec": {"model": {"path": "/m"}, **nest("spec.gpu.mps.trainerSharePercent", share)},
    }
    errors = admission_errors(session)
    if message is None:
        assert errors == []
        assert parse_spec(session["spec"]).gpu.mps == spec_module.MpsSpec(share)
    else:
        assert any(e == f"spec.gpu.mps.trainerSharePercent: {message}" for e in errors), errors


def nest(path: str, value: Any) -> dict[str, Any]:
    *parents, leaf = path.split(".")[1:]
    root: dict[str, Any] = {}
    node = root
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value
    return root


# ---- examples and fixtures ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_admitted_and_runnable(path: Path) -> None:
    sessions = [d for d in documents(path) if d["kind"] == defaults.KIND]
    assert sessions, "every example holds a TrainingSession"
    for doc in documents(path):
        if doc["kind"] == defaults.KIND:
            assert admission_errors(doc) == []
            parse_spec(apply_defaults(SCHEMA, copy.deepcopy(doc))["spec"])
            parse_spec(doc["spec"])
        else:
            kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_there_is_an_example_of_each_kind() -> None:
    assert {"minimal", "full", "dra", "device-plugin"} <= {p.stem for p in EXAMPLES}


def fixture_case(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any], str]:
    docs = documents(path)
    old, new = (docs[0], docs[1]) if len(docs) == 2 else (None, docs[0])
    return old, new, new["metadata"]["annotations"][EXPECT]


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_fixture_is_rejected_with_its_message(path: Path) -> None:
    old, new, expected = fixture_case(path)
    if old is not None:
        assert admission_errors(old) == [], "the stored object of an update fixture must be valid"
    errors = admission_errors(new, old)
    assert any(expected in e for e in errors), f"expected {expected!r} in {errors}"


def cel_messages() -> set[str]:
    return {
        rule["message"] for _, sub in walk(SCHEMA) for rule in sub.get("x-kubernetes-validations", [])
    } | {rule["message"] for rule in SCHEMA.get("x-kubernetes-validations", [])}


def test_every_cel_rule_has_a_fixture_that_trips_it() -> None:
    expected = {fixture_case(p)[2] for p in INVALID}
    untested = [m for m in cel_messages() if not any(e in m for e in expected)]
    assert untested == []


# ---- the same fixtures against a real API server ------------------------------------------------------
def kubectl() -> str:
    found = shutil.which(
        "kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if not found:
        pytest.skip("kubectl is not installed (scripts/install_tools.py installs it)")
    return found


@pytest.mark.e2e
@pytest.mark.skipif(
    not os.environ.get("KUBECONFIG"), reason="needs a real cluster: set KUBECONFIG (kind or k3d)"
)
@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_fixture_is_rejected_by_a_real_api_server(path: Path) -> None:
    old, new, expected = fixture_case(path)
    subprocess.run(
        [kubectl(), "apply", "--server-side=false", "-f", str(CRD_PATH)], check=True, capture_output=True
    )
    if old is not None:
        subprocess.run(
            [kubectl(), "apply", "-f", "-"],
            input=yaml.safe_dump(old),
            text=True,
            check=True,
            capture_output=True,
        )
    try:
        result = subprocess.run(
            [kubectl(), "apply", "--dry-run=server", "-f", "-"],
            input=yaml.safe_dump(new),
            text=True,
            capture_output=True,
        )
        assert result.returncode != 0, "the API server admitted an invalid TrainingSession"
        if expected in cel_messages() or any(expected in m for m in cel_messages()):
            assert expected in result.stderr  # our own CEL messages read the same everywhere
    finally:
        if old is not None:
            subprocess.run(
                [kubectl(), "delete", "-f", "-", "--wait=false"],
                input=yaml.safe_dump(old),
                text=True,
                capture_output=True,
            )
