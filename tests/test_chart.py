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

import functools
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "hogwild"
FIXTURES = ROOT / "tests" / "fixtures" / "helm"
VALUES_FILES = sorted(path.stem for path in FIXTURES.glob("*.yaml"))
CRD_NAME = "hogwild.dev_trainingsessions.yaml"
BIN = Path(sys.prefix) / "bin"
RELEASE, NAMESPACE = "hw-release", "hogwild-system"
# The chart's kubeVersion floor, and the newest release kubernetes-validate carries schemas for.
KUBE_VERSIONS = ["1.33.0", "1.37.0"]
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
# kopf's peering objects: their CRD (crds/kopf.dev_peerings.yaml) keeps any field, so there is nothing to check.
UNVALIDATED_KINDS = MONITORING_KINDS | {"ClusterKopfPeering", "KopfPeering"}


def tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{name} is missing from {BIN}: run `python3 scripts/dev.py venv` (install_tools.py)")
    return path


def helm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, check=False)


@functools.cache
def rendered_text(values: str, kube_version: str = "1.35.0", *sets: str) -> str:
    set_args = [arg for item in sets for arg in ("--set", item)]
    result = helm(
        "template", RELEASE, CHART, "--namespace", NAMESPACE, "--include-crds",
        "--kube-version", kube_version, "-f", FIXTURES / f"{values}.yaml", *set_args,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(values: str, *sets: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered_text(values, "1.35.0", *sets)) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


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


# --- monitoring objects (Prometheus Operator kinds: no offline schema, so checked here) --------------------


def test_servicemonitor_scrapes_the_operator_service_and_keeps_its_labels() -> None:
    docs = rendered("monitoring")
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    # The operator's series carry namespace/session labels of their own.
    assert endpoint["honorLabels"] is True


def test_podmonitor_scrapes_vllm_and_worker_ports_and_labels_the_session() -> None:
    monitor = one(rendered("monitoring"), "PodMonitor")
    assert monitor["spec"]["selector"] == {
        "matchLabels": {"app.kubernetes.io/name": "hogwild", "app.kubernetes.io/component": "session"}
    }
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [endpoint["port"] for endpoint in endpoints] == ["http", "metrics"]
    for endpoint in endpoints:
        assert endpoint["interval"] == "10s"
        assert {
            "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
            "targetLabel": "session",
        } in endpoint["relabelings"]


SESSION_SPECS = [
    pytest.param({"model": {"path": "/models/qwen"}}, id="device-plugin"),
    pytest.param({"model": {"path": "/models/tiny"}, "gpu": {"count": 0}}, id="cpu"),
    pytest.param(
        {"model": {"path": "/m"}, "gpu": {"sharing": "DRA", "claim": {"resourceClaimName": "gpu-0"}}},
        id="dra",
    ),
]


@pytest.mark.parametrize("spec", SESSION_SPECS)
def test_podmonitor_selects_the_pods_the_operator_builds(spec: dict[str, Any]) -> None:
    """The operator's real pod builder makes the pods; the PodMonitor must find them and their ports."""
    from hogwild.operator import builders, pod_builder
    from hogwild.operator.spec import parse_spec

    session = builders.SessionRef(name="qwen-chat", namespace="ml", uid="u-1")
    pod = pod_builder.build_pod(session, parse_spec(spec))
    monitor = one(rendered("monitoring"), "PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == session.name  # becomes `session`
    containers = pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
    ports = {port["name"] for container in containers for port in container.get("ports", [])}
    assert {endpoint["port"] for endpoint in monitor["podMetricsEndpoints"]} <= ports


def test_operator_pods_are_not_selected_by_the_session_podmonitor() -> None:
    docs = rendered("monitoring")
    selector = one(docs, "PodMonitor")["spec"]["selector"]["matchLabels"]
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= labels.items()


@pytest.mark.parametrize(
    ("values", "expected"), [("default", {"any": True}), ("namespaced", {"matchNames": ["team-a", "team-b"]})]
)
def test_podmonitor_looks_where_sessions_live(values: str, expected: dict[str, Any]) -> None:
    monitor = one(rendered(values, "metrics.podMonitor.enabled=true"), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == expected


def test_prometheusrule_ships_the_promtool_tested_rules_file() -> None:
    rule = one(rendered("monitoring"), "PrometheusRule")
    shipped = yaml.safe_load((CHART / "rules" / "hogwild-alerts.yaml").read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert [group["name"] for group in rule["spec"]["groups"]] == [
        group["name"] for group in shipped["groups"]
    ]
    for rendered_group, shipped_group in zip(rule["spec"]["groups"], shipped["groups"], strict=True):
        for rendered_rule, shipped_rule in zip(rendered_group["rules"], shipped_group["rules"], strict=True):
            assert rendered_rule["labels"] == {"team": "ml-platform", **shipped_rule["labels"]}
            assert {**rendered_rule, "labels": None} == {**shipped_rule, "labels": None}


@pytest.mark.parametrize(
    ("values", "kinds"),
    [
        ("default", set()),
        ("monitoring", MONITORING_KINDS),
    ],
)
def test_monitoring_objects_only_when_enabled(values: str, kinds: set[str]) -> None:
    assert {doc["kind"] for doc in rendered(values)} & MONITORING_KINDS == kinds


# --- dashboards --------------------------------------------------------------------------------------------

DASHBOARDS = sorted(path.name for path in (CHART / "dashboards").glob("*.json"))


def test_dashboards_exist() -> None:
    assert {"training.json", "interference.json", "operator.json"} <= set(DASHBOARDS)


@pytest.mark.parametrize(("values", "namespace"), [("default", NAMESPACE), ("monitoring", "monitoring")])
def test_dashboards_render_into_labelled_configmaps(values: str, namespace: str) -> None:
    maps = [
        doc
        for doc in of_kind(rendered(values), "ConfigMap")
        if "grafana_dashboard" in doc["metadata"]["labels"]
    ]
    shipped = {
        f"hogwild-{name}": json.loads((CHART / "dashboards" / name).read_text()) for name in DASHBOARDS
    }
    found = {}
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == namespace
        for key, text in config_map["data"].items():
            found[key] = json.loads(text)
    assert found == shipped


def test_dashboards_can_be_turned_off() -> None:
    assert not of_kind(rendered("custom"), "ConfigMap")


def test_dashboard_folder_annotation_is_passed_through() -> None:
    for config_map in of_kind(rendered("monitoring"), "ConfigMap"):
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "hogwild"}


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
