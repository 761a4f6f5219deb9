"""The Helm chart, rendered by the real helm binary and checked by real validators.

`helm lint --strict` and `helm template` run over every values file in tests/fixtures/helm/, and
`kubernetes-validate --strict` checks every rendered object of a built-in kind against the schemas of the
oldest Kubernetes the chart supports and the newest the validator knows. It has no schemas for the
Prometheus Operator's kinds (ServiceMonitor, PodMonitor, PrometheusRule) nor for kopf's peering objects:
those are handled explicitly, by a test that only they go unvalidated and by the structural assertions
below. The CRDs themselves are a built-in kind (CustomResourceDefinition) and are validated.

helm and kubectl come from scripts/install_tools.py (pinned sha256), which scripts/dev.py runs.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_helpers import (
    CHART,
    CRD_NAME,
    FIXTURES,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    ROOT,
    UNVALIDATED_KINDS,
    VALUES_FILES,
    helm,
    of_kind,
    one,
    rendered,
    rendered_text,
    tool,
)


def test_fixtures_exist() -> None:
    assert {"default", "namespaced", "monitoring", "custom"} <= set(VALUES_FILES)


# --- helm itself -------------------------------------------------------------------------------------------


def test_helm_is_the_pinned_version() -> None:
    result = helm("version", "--short")
    assert result.stdout.startswith("v4.1.4"), result.stdout + result.stderr


@pytest.mark.parametrize("values", VALUES_FILES)
def test_helm_lint_strict_passes(values: str) -> None:
    result = helm("lint", "--strict", CHART, "--namespace", NAMESPACE, "-f", FIXTURES / f"{values}.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


INVALID_VALUES = [
    pytest.param(
        ["watch.scope=everywhere"], "value must be one of 'cluster', 'namespaces'", id="unknown-scope"
    ),
    pytest.param(["operator.image.tag=latest"], "/operator/image/tag", id="latest-tag"),
    pytest.param(["operator.image.digest=sha256:abc"], "/operator/image/digest", id="short-digest"),
    pytest.param(["operator.replicas=2"], "needs operator.peering.enabled", id="replicas-without-peering"),
    pytest.param(["serviceAccount.create=false"], "serviceAccount.name is required", id="no-serviceaccount"),
    pytest.param(["operator.image.repository="], "/operator/image/repository", id="no-repository"),
    pytest.param(["sessionImages.trainer.tag="], "sessionImages.trainer.tag or", id="no-trainer-tag"),
    pytest.param(["operator.logFormat=loud"], "/operator/logFormat", id="unknown-log-format"),
    pytest.param(["operator.replica=1"], "additional properties 'replica' not allowed", id="typo-in-key"),
    pytest.param(["metrics.podMonitor.interval=often"], "/metrics/podMonitor/interval", id="bad-duration"),
]


@pytest.mark.parametrize(("sets", "message"), INVALID_VALUES)
def test_invalid_values_are_refused_with_a_message(sets: list[str], message: str) -> None:
    set_args = [arg for item in sets for arg in ("--set", item)]
    result = helm("template", RELEASE, CHART, *set_args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# --- kubernetes-validate -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUES_FILES)
def test_rendered_objects_validate_strictly(values: str, kube_version: str, tmp_path: Path) -> None:
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(rendered_text(values, kube_version))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--kubernetes-version", kube_version, manifest],
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ERROR" not in output, output
    # Only the Prometheus Operator's kinds and kopf's peering objects may go unvalidated (no schema offline).
    unvalidated = set(re.findall(r"Couldn't find schema for kind (\w+)", output))
    assert unvalidated <= UNVALIDATED_KINDS, output
    docs = [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc]
    validated = [doc for doc in docs if doc["kind"] not in UNVALIDATED_KINDS]
    assert output.count(" passed for resource ") == len(validated), output


# --- RBAC: exactly the verbs the operator uses -------------------------------------------------------------

Rules = dict[tuple[str, str], set[str]]
OPERATOR_RULES: Rules = {
    ("hogwild.dev", "trainingsessions"): {"list", "watch", "patch"},
    ("hogwild.dev", "trainingsessions/status"): {"patch"},
    ("hogwild.dev", "trainingsessions/finalizers"): {"update"},
    ("", "pods"): {"get", "create", "delete"},
    ("", "configmaps"): {"get", "create", "patch"},
    ("", "services"): {"get", "create"},
    ("", "persistentvolumeclaims"): {"get", "create"},
    ("", "secrets"): {"get", "create"},
    ("", "events"): {"create"},
    ("policy", "poddisruptionbudgets"): {"get", "create", "delete"},
    ("networking.k8s.io", "networkpolicies"): {"get", "create"},
}
PEERING_VERBS = {"list", "watch", "patch"}


def flatten(rules: list[dict[str, Any]]) -> Rules:
    table: Rules = {}
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert (group, resource) not in table, f"{group}/{resource} listed twice"
                table[(group, resource)] = set(rule["verbs"])
    return table


RBAC_CASES = [
    pytest.param("default", "ClusterRole", [None], OPERATOR_RULES, id="cluster"),
    pytest.param(
        "namespaced",
        "Role",
        ["team-a", "team-b"],
        {**OPERATOR_RULES, ("kopf.dev", "kopfpeerings"): PEERING_VERBS},
        id="namespaces-with-peering",
    ),
    pytest.param(
        "default",
        "ClusterRole",
        [None],
        {**OPERATOR_RULES, ("kopf.dev", "clusterkopfpeerings"): PEERING_VERBS},
        id="cluster-with-peering",
    ),
]


@pytest.mark.parametrize(("values", "kind", "namespaces", "expected"), RBAC_CASES)
def test_rbac_grants_exactly_what_the_operator_uses(
    values: str, kind: str, namespaces: list[str | None], expected: Rules, request: pytest.FixtureRequest
) -> None:
    sets = ("operator.peering.enabled=true",) if request.node.callspec.id == "cluster-with-peering" else ()
    docs = rendered(values, *sets)
    roles = of_kind(docs, kind)
    assert [role["metadata"].get("namespace") for role in roles] == namespaces
    for role in roles:
        assert flatten(role["rules"]) == expected
    other = {"Role", "ClusterRole"} - {kind}
    assert not any(of_kind(docs, name) for name in other), f"a {other} was rendered too"


@pytest.mark.parametrize("values", VALUES_FILES)
def test_rbac_never_uses_wildcards_or_escalating_verbs(values: str) -> None:
    for role in of_kind(rendered(values), "Role") + of_kind(rendered(values), "ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])


@pytest.mark.parametrize("values", VALUES_FILES)
def test_bindings_point_at_the_operator_serviceaccount(values: str) -> None:
    docs = rendered(values)
    deployment = one(docs, "Deployment")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = of_kind(docs, "RoleBinding") + of_kind(docs, "ClusterRoleBinding")
    assert bindings
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
        role_kind = "Role" if binding["kind"] == "RoleBinding" else "ClusterRole"
        assert binding["roleRef"]["kind"] == role_kind
        roles = of_kind(docs, role_kind)
        assert any(role["metadata"]["name"] == binding["roleRef"]["name"] for role in roles)


# --- the operator Deployment -------------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES_FILES)
def test_operator_pod_runs_locked_down(values: str) -> None:
    pod = one(rendered(values), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["privileged"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert "resources" in container and container["resources"]["requests"]


SCOPE_ARGS = [
    pytest.param("default", ["--all-namespaces", "--standalone"], id="cluster"),
    pytest.param(
        "namespaced", ["--namespace=team-a", "--namespace=team-b", "--peering=hogwild-peering"], id="ns"
    ),
]


@pytest.mark.parametrize(("values", "expected"), SCOPE_ARGS)
def test_operator_watches_what_rbac_allows(values: str, expected: list[str]) -> None:
    container = one(rendered(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["hogwild", "operator"]
    assert container["args"][: len(expected)] == expected


@pytest.mark.parametrize("values", VALUES_FILES)
def test_operator_accepts_the_rendered_command_line(values: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hogwild operator`'s real argument parser reads the Deployment's args and env as the pod would."""
    from hogwild.operator import main

    docs = rendered(values)
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for item in container["env"]:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    args = main.parse_args(container["args"])
    options = main.options_from_args(args)
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert options.image_defaults.vllm == env["HOGWILD_VLLM_IMAGE"]
    assert options.image_defaults.trainer == env["HOGWILD_TRAINER_IMAGE"]
    assert options.metrics_port == container["ports"][0]["containerPort"]
    peering = [d for d in docs if d["apiVersion"] == "kopf.dev/v1"]
    assert args.standalone == (not peering)
    assert all(d["metadata"]["name"] == args.peering for d in peering)
    roles = of_kind(docs, "Role")
    assert sorted(args.namespace) == sorted(role["metadata"]["namespace"] for role in roles)


IMAGE_CASES = [
    pytest.param(
        "default",
        {
            "operator": "ghcr.io/hogwild-dev/hogwild-operator:0.1.0",
            "HOGWILD_VLLM_IMAGE": "ghcr.io/hogwild-dev/hogwild-vllm:0.1.0",
            "HOGWILD_TRAINER_IMAGE": "ghcr.io/hogwild-dev/hogwild-trainer:0.1.0",
        },
        id="tags",
    ),
    pytest.param(
        "custom",
        {
            "operator": "registry.example.com/ml/hogwild-operator@sha256:" + "0123456789abcdef" * 4,
            "HOGWILD_VLLM_IMAGE": "registry.example.com/ml/hogwild-vllm@sha256:" + "1" * 64,
            "HOGWILD_TRAINER_IMAGE": "registry.example.com/ml/hogwild-trainer:0.1.0-cu13",
        },
        id="digests",
    ),
]


@pytest.mark.parametrize(("values", "expected"), IMAGE_CASES)
def test_images_are_pinned(values: str, expected: dict[str, str]) -> None:
    container = one(rendered(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert container["image"] == expected["operator"]
    assert env["HOGWILD_VLLM_IMAGE"] == expected["HOGWILD_VLLM_IMAGE"]
    assert env["HOGWILD_TRAINER_IMAGE"] == expected["HOGWILD_TRAINER_IMAGE"]


def test_default_tags_are_the_app_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    images = [
        values["operator"]["image"],
        values["sessionImages"]["vllm"],
        values["sessionImages"]["trainer"],
    ]
    assert [image["tag"] for image in images] == [chart["appVersion"]] * 3


def test_scheduling_values_reach_the_pod() -> None:
    values = yaml.safe_load((FIXTURES / "custom.yaml").read_text())["operator"]
    pod = one(rendered("custom"), "Deployment")["spec"]["template"]["spec"]
    for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert pod[field] == values[field], field
    assert pod["containers"][0]["resources"] == values["resources"]
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["serviceAccountName"] == "hogwild-operator"


@pytest.mark.parametrize("values", VALUES_FILES)
def test_every_object_carries_the_recommended_labels(values: str) -> None:
    for doc in rendered(values):
        if doc["kind"] == "CustomResourceDefinition":
            continue  # crds/ is applied verbatim by helm, never templated
        labels = doc["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by"):
            assert key in labels, f"{doc['kind']}/{doc['metadata']['name']} lacks {key}"
        assert labels["helm.sh/chart"] == "hogwild-0.1.0"


# --- the CRD copy ------------------------------------------------------------------------------------------


PEERING_CASES = [
    pytest.param("default", (), [], id="standalone"),
    pytest.param("default", ("operator.peering.enabled=true",), [("ClusterKopfPeering", None)], id="cluster"),
    pytest.param("namespaced", (), [("KopfPeering", "team-a"), ("KopfPeering", "team-b")], id="namespaces"),
]


@pytest.mark.parametrize(("values", "sets", "expected"), PEERING_CASES)
def test_peering_objects_exist_where_the_operator_looks(
    values: str, sets: tuple[str, ...], expected: list[tuple[str, str | None]]
) -> None:
    docs = rendered(values, *sets)
    found = [(d["kind"], d["metadata"].get("namespace")) for d in docs if d["apiVersion"] == "kopf.dev/v1"]
    assert found == expected
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    names = {d["metadata"]["name"] for d in docs if d["apiVersion"] == "kopf.dev/v1"}
    assert names <= {arg.removeprefix("--peering=") for arg in args}


def test_chart_crd_is_identical_to_the_top_level_crd() -> None:
    top_level = ROOT / "crds" / CRD_NAME
    copy = CHART / "crds" / CRD_NAME
    assert top_level.is_file(), f"{top_level} does not exist yet (the operator issue writes it)"
    assert copy.is_file(), f"copy {top_level} to {copy}"
    assert copy.read_bytes() == top_level.read_bytes(), f"{copy} differs from {top_level}: copy it again"
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [CRD_NAME, "kopf.dev_peerings.yaml"]


def test_crd_is_installed_with_the_chart() -> None:
    crds = of_kind(rendered("default"), "CustomResourceDefinition")
    assert sorted(crd["metadata"]["name"] for crd in crds) == [
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
        "trainingsessions.hogwild.dev",
    ]


# --- values.yaml documentation -----------------------------------------------------------------------------


def value_lines() -> Iterator[tuple[str, bool, bool]]:
    """(dotted key, documented by a `# --` comment just above, is a leaf) for each key line of values.yaml."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([\w.-]+):(.*)$", line)
        if not match or line.lstrip().startswith("- "):
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        comments = []
        for previous in reversed(lines[:number]):
            if not previous.strip().startswith("#"):
                break
            comments.append(previous.strip())
        documented = any(comment.startswith("# --") for comment in comments)
        following = next((line for line in lines[number + 1 :] if line.strip()), "")
        has_children = not rest and len(following) - len(following.lstrip()) > indent
        yield path, documented, not has_children or following.lstrip().startswith("- ")
        stack.append((indent, key))


def test_every_value_is_documented() -> None:
    documented = {path for path, doc, _ in value_lines() if doc}
    undocumented = [
        path
        for path, _, leaf in value_lines()
        if leaf and not any(path == d or path.startswith(d + ".") for d in documented)
    ]
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def schema_has(schema: dict[str, Any], path: str) -> bool:
    node = schema
    for key in path.split("."):
        properties = node.get("properties", {})
        if key not in properties:
            return node.get("type") == "object" and "properties" not in node  # a free-form object
        node = properties[key]
    return "description" in node


def test_every_value_is_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing = [path for path, _, _ in value_lines() if not schema_has(schema, path)]
    assert not missing, f"values.schema.json lacks: {missing}"
