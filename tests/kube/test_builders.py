"""The pod and its neighbours, as the operator builds them: tables of specs in, Kubernetes objects out.

Every built object also goes through `kubernetes-validate --strict` (the schemas of Kubernetes 1.33, the
floor for native sidecars, and 1.37), so a typo in a field name fails here, not in a cluster.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from hogwild import auth, defaults
from hogwild.config import config_to_dict
from hogwild.operator import builders, pod_builder
from hogwild.operator.relay import client_keys
from hogwild.operator.spec import SessionSpec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
SESSION = builders.SessionRef(name="chat", namespace="ml", uid="0f4c2a9e-1111-2222-3333-444455556666")
KEYS = {name: (name.replace(".", "-") * 8)[:40].encode() for name in auth.CURVE_FILES}
KUBE_VERSIONS = ["1.33.0", "1.37.0"]

SPECS: dict[str, dict[str, Any]] = {
    "cpu": {"model": {"path": "/models/tiny"}, "gpu": {"count": 0}},
    "device-plugin": {"model": {"path": "/models/qwen"}},
    "dra-claim": {
        "model": {"path": "/m"},
        "gpu": {"sharing": "DRA", "claim": {"resourceClaimName": "gpu-0"}},
    },
    "dra-template": {
        "model": {"path": "/m"},
        "gpu": {"sharing": "DRA", "claim": {"resourceClaimTemplateName": "one-gpu"}},
    },
    "mps": {"model": {"path": "/m"}, "gpu": {"mps": {"trainerSharePercent": 70}}},
    "mps-dra": {
        "model": {"path": "/m"},
        "gpu": {
            "sharing": "DRA",
            "claim": {"resourceClaimName": "gpu-0"},
            "mps": {"trainerSharePercent": 40},
        },
        "trainer": {"env": [{"name": "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "value": "100"}]},
    },
    "model-pvc": {"model": {"path": "qwen2-7b", "claimName": "models"}},
    "existing-claim": {"model": {"path": "/m"}, "checkpoint": {"storage": {"existingClaim": "ckpt"}}},
    "retained-pvc": {
        "model": {"path": "/m"},
        "checkpoint": {"storage": {"retainOnDelete": True, "size": "5Gi"}},
    },
    "named-secrets": {
        "model": {"path": "/m"},
        "auth": {"tokenSecretRef": {"name": "tok", "key": "t"}, "curveSecretRef": {"name": "keys"}},
    },
    "full": {
        "model": {"path": "/m", "servedName": "chat", "restore": "Base"},
        "images": {
            "vllm": "reg/vllm:1",
            "trainer": "reg/trainer:1",
            "pullPolicy": "Always",
            "pullSecrets": ["reg"],
        },
        "vllm": {
            "args": ["--max-model-len", "4096"],
            "resources": {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"memory": "48Gi"}},
            "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}],
        },
        "trainer": {"resources": {"requests": {"cpu": "500m"}}},
        "training": {"lr": 2e-5, "paused": True, "protection": {"maxDutyCycle": 0.5}},
        "checkpoint": {
            "intervalSeconds": 120,
            "keep": 5,
            "storage": {"storageClassName": "fast", "size": "100Gi"},
        },
        "metrics": {"enabled": False},
        "pod": {
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "high",
            "serviceAccountName": "trainer",
            "terminationGracePeriodSeconds": 900,
            "annotations": {"team": "ml"},
            "labels": {"tier": "gold"},
        },
    },
}


def spec_of(name: str) -> SessionSpec:
    return parse_spec(SPECS[name])


def pod_of(name: str) -> dict[str, Any]:
    return pod_builder.build_pod(SESSION, spec_of(name))


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found = [
        c for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"] if c["name"] == name
    ]
    assert len(found) == 1, f"expected one container {name}"
    return found[0]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def mounts_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c["volumeMounts"]}


def all_objects(name: str) -> list[dict[str, Any]]:
    spec = spec_of(name)
    objects = [
        pod_builder.build_pod(SESSION, spec),
        builders.build_service(SESSION, spec),
        builders.build_config_map(SESSION, spec),
        builders.build_token_secret(SESSION, spec, "tok3n"),
        builders.build_curve_secret(SESSION, spec, KEYS),
        builders.build_network_policy(SESSION, spec),
    ]
    pvc = builders.build_pvc(SESSION, spec)
    return objects + ([pvc] if pvc else [])


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_object_is_valid_kubernetes(name: str, version: str) -> None:
    for obj in all_objects(name):
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_child_is_owned_by_the_session_except_a_retained_pvc(name: str) -> None:
    for obj in all_objects(name):
        refs = obj["metadata"].get("ownerReferences", [])
        retained = obj["kind"] == "PersistentVolumeClaim" and name == "retained-pvc"
        assert refs == ([] if retained else [builders.owner_reference(SESSION)]), obj["kind"]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_pod_shares_process_namespace_and_memory_dirs_in_both_containers(name: str) -> None:
    pod = pod_of(name)
    assert pod["spec"]["shareProcessNamespace"] is True
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["run"]["emptyDir"] == {"medium": "Memory"}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory"}
    for c in ("vllm", "trainer"):
        mounts = mounts_of(container(pod, c))
        assert mounts[defaults.RUN_DIR]["name"] == "run"
        assert mounts["/dev/shm"]["name"] == "shm"
        assert mounts[defaults.CHECKPOINT_DIR]["name"] == "checkpoints"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_pod_is_locked_down_non_root_without_an_api_token(name: str) -> None:
    pod = pod_of(name)
    assert pod["spec"]["automountServiceAccountToken"] is False, "neither container talks to the API"
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in ("vllm", "trainer"):
        context = container(pod, c)["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False, c
        assert context["capabilities"] == {"drop": ["ALL"]}, c


def test_session_user_is_the_images_user() -> None:
    """runAsUser must be the UID the images create, or the home dir and caches are not writable."""
    for image in ("vllm", "trainer"):
        dockerfile = (ROOT / "images" / image / "Dockerfile").read_text()
        assert f"USER {pod_builder.SESSION_UID}:{pod_builder.SESSION_UID}" in dockerfile, image


def test_vllm_is_a_native_sidecar_so_it_outlives_the_trainer() -> None:
    pod = pod_of("device-plugin")
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["vllm"]
    assert pod["spec"]["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["trainer"]


@pytest.mark.parametrize(
    ("container_name", "command"),
    [("vllm", ["hogwild", "vllm"]), ("trainer", ["hogwild", "worker"])],
    ids=["vllm", "trainer"],
)
def test_container_commands(container_name: str, command: list[str]) -> None:
    assert container(pod_of("cpu"), container_name)["command"] == command


def test_container_ports_come_from_hogwild_defaults() -> None:
    pod = pod_of("cpu")
    ports = {p["name"]: p["containerPort"] for c in ("vllm", "trainer") for p in container(pod, c)["ports"]}
    assert ports == {
        "http": defaults.VLLM_HTTP_PORT,
        "metrics": defaults.WORKER_METRICS_PORT,
        "control": defaults.WORKER_CONTROL_PORT,
    }


@pytest.mark.parametrize(
    ("name", "vllm_limits", "trainer_visible", "claims"),
    [
        ("cpu", {}, None, None),
        ("device-plugin", {"nvidia.com/gpu": "1"}, "all", None),
        ("dra-claim", {}, None, [{"name": "gpu", "resourceClaimName": "gpu-0"}]),
        ("dra-template", {}, None, [{"name": "gpu", "resourceClaimTemplateName": "one-gpu"}]),
    ],
    ids=["cpu", "device-plugin", "dra-claim", "dra-template"],
)
def test_gpu_sharing(
    name: str, vllm_limits: dict[str, str], trainer_visible: str | None, claims: Any
) -> None:
    pod = pod_of(name)
    vllm, trainer = container(pod, "vllm"), container(pod, "trainer")
    assert vllm["resources"].get("limits", {}) == vllm_limits
    assert "limits" not in trainer["resources"], "only vLLM requests the GPU from the device plugin"
    assert env_of(trainer).get("NVIDIA_VISIBLE_DEVICES") == trainer_visible
    assert pod["spec"].get("resourceClaims") == claims
    expected_container_claims = [{"name": "gpu"}] if claims else None
    assert vllm["resources"].get("claims") == expected_container_claims
    assert trainer["resources"].get("claims") == expected_container_claims


MPS_DIRS = {
    "CUDA_MPS_PIPE_DIRECTORY": "/run/hogwild/mps/pipe",
    "CUDA_MPS_LOG_DIRECTORY": "/run/hogwild/mps/log",
}


@pytest.mark.parametrize(
    ("name", "vllm_mps", "trainer_mps"),
    [
        ("device-plugin", {}, {}),
        ("cpu", {}, {}),
        (
            "mps",
            {**MPS_DIRS, "HOGWILD_MPS_START_DAEMON": "1"},
            {**MPS_DIRS, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "70"},
        ),
        (
            "mps-dra",
            {**MPS_DIRS, "HOGWILD_MPS_START_DAEMON": "1"},
            {**MPS_DIRS, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "40"},
        ),
    ],
    ids=["off", "cpu", "device-plugin", "dra-and-a-user-env-that-loses"],
)
def test_mps_env_on_both_containers_and_the_daemon_flag_on_vllm_only(
    name: str, vllm_mps: dict[str, str], trainer_mps: dict[str, str]
) -> None:
    """vllm starts first (a native sidecar), so it starts the daemon; both are clients, the trainer capped."""
    pod = pod_of(name)
    for container_name, expected in (("vllm", vllm_mps), ("trainer", trainer_mps)):
        env = env_of(container(pod, container_name))
        assert {k: v for k, v in env.items() if "MPS" in k} == expected, container_name
    mounted = {m["name"] for m in container(pod, "trainer")["volumeMounts"]}
    assert "run" in mounted, "the pipe dir lies on the run emptyDir that both containers mount"


def test_curve_file_names_match_hogwild_auth() -> None:
    assert builders.CURVE_FILES == auth.CURVE_FILES


def test_worker_mount_of_curve_keys_leaves_out_the_client_secret() -> None:
    volumes = {v["name"]: v for v in pod_of("cpu")["spec"]["volumes"]}
    items = [item["key"] for item in volumes["curve"]["secret"]["items"]]
    assert sorted(items) == ["client.public", "server.public", "server.secret"]


@pytest.mark.parametrize(
    ("container_name", "mounted", "not_mounted"),
    [("vllm", "token", "curve"), ("trainer", "curve", "token")],
    ids=["vllm-gets-the-token", "trainer-gets-the-curve-keys"],
)
def test_each_container_mounts_only_its_own_secret(
    container_name: str, mounted: str, not_mounted: str
) -> None:
    names = {m["name"] for m in container(pod_of("cpu"), container_name)["volumeMounts"]}
    assert mounted in names and not_mounted not in names


@pytest.mark.parametrize(
    ("name", "token_secret", "token_key", "curve_secret"),
    [("cpu", "chat-token", "token", "chat-curve"), ("named-secrets", "tok", "t", "keys")],
    ids=["generated", "named"],
)
def test_secret_names_and_token_file(name: str, token_secret: str, token_key: str, curve_secret: str) -> None:
    pod = pod_of(name)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == token_secret
    assert volumes["curve"]["secret"]["secretName"] == curve_secret
    assert env_of(container(pod, "vllm"))[defaults.ENV_TOKEN_FILE] == f"{pod_builder.TOKEN_MOUNT}/{token_key}"
    assert env_of(container(pod, "trainer"))[pod_builder.CURVE_ENV] == pod_builder.CURVE_MOUNT


@pytest.mark.parametrize(
    ("name", "claim", "pvc_built"),
    [
        ("cpu", "chat-checkpoints", True),
        ("existing-claim", "ckpt", False),
        ("retained-pvc", "chat-checkpoints", True),
    ],
    ids=["new", "existing", "retained"],
)
def test_checkpoint_volume(name: str, claim: str, pvc_built: bool) -> None:
    volumes = {v["name"]: v for v in pod_of(name)["spec"]["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == claim
    assert (builders.build_pvc(SESSION, spec_of(name)) is not None) == pvc_built


def test_new_pvc_takes_size_and_class() -> None:
    pvc = builders.build_pvc(SESSION, spec_of("full"))
    assert pvc is not None
    assert pvc["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert pvc["spec"]["storageClassName"] == "fast"


@pytest.mark.parametrize(
    ("name", "model_arg", "model_mounted"),
    [("cpu", "/models/tiny", False), ("model-pvc", "/models/qwen2-7b", True)],
    ids=["path", "pvc"],
)
def test_model_location(name: str, model_arg: str, model_mounted: bool) -> None:
    pod = pod_of(name)
    args = container(pod, "vllm")["args"]
    assert args[args.index("--model") + 1] == model_arg
    for c in ("vllm", "trainer"):
        mount = mounts_of(container(pod, c)).get(pod_builder.MODEL_MOUNT)
        assert (mount is not None and mount["readOnly"]) == model_mounted


def test_vllm_args_follow_the_separator_unchanged() -> None:
    args = container(pod_of("full"), "vllm")["args"]
    assert args[args.index("--") + 1 :] == ["--max-model-len", "4096"]
    assert args[args.index("--served-model-name") + 1] == "chat"


def test_trainer_starts_with_the_desired_config_from_the_config_map() -> None:
    spec = spec_of("full")
    config_map = builders.build_config_map(SESSION, spec)
    assert json.loads(config_map["data"][builders.CONFIG_KEY]) == config_to_dict(spec.training)
    trainer = container(pod_builder.build_pod(SESSION, spec), "trainer")
    assert env_of(trainer)[pod_builder.CONFIG_ENV] == {
        "configMapKeyRef": {"name": "chat-config", "key": builders.CONFIG_KEY}
    }
    assert trainer["args"][trainer["args"].index("--config") + 1] == f"$({pod_builder.CONFIG_ENV})"


def test_pod_and_service_carry_the_session_labels() -> None:
    spec = spec_of("full")
    wanted = {"app.kubernetes.io/name": "hogwild", "app.kubernetes.io/instance": "chat"}
    pod, service = pod_builder.build_pod(SESSION, spec), builders.build_service(SESSION, spec)
    assert wanted.items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["labels"]["tier"] == "gold"
    assert service["spec"]["selector"] == wanted


@pytest.mark.parametrize(
    ("name", "scraped"), [("cpu", True), ("full", False)], ids=["metrics-on", "metrics-off"]
)
def test_prometheus_annotations(name: str, scraped: bool) -> None:
    annotations = pod_of(name)["metadata"]["annotations"]
    assert (annotations.get("prometheus.io/scrape") == "true") == scraped
    if scraped:
        assert annotations["prometheus.io/port"] == str(defaults.WORKER_METRICS_PORT)


def test_pod_scheduling_fields() -> None:
    pod_spec = pod_of("full")["spec"]
    assert pod_spec["nodeSelector"] == {"gpu": "h100"}
    assert pod_spec["priorityClassName"] == "high"
    assert pod_spec["serviceAccountName"] == "trainer"
    assert pod_spec["terminationGracePeriodSeconds"] == 900
    assert pod_spec["imagePullSecrets"] == [{"name": "reg"}]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_pod_hash_is_stable_and_recorded(name: str) -> None:
    first, second = pod_of(name), pod_of(name)
    recorded = first["metadata"]["annotations"][pod_builder.POD_HASH_ANNOTATION]
    assert recorded == second["metadata"]["annotations"][pod_builder.POD_HASH_ANNOTATION]
    assert recorded == pod_builder.pod_hash(first)


def test_curve_secret_round_trips_to_the_operator_keys() -> None:
    secret = builders.build_curve_secret(SESSION, spec_of("cpu"), KEYS)
    keys = client_keys(secret)
    assert (keys.public, keys.secret, keys.peer_public) == (
        KEYS["client.public"],
        KEYS["client.secret"],
        KEYS["server.public"],
    )


def test_client_keys_name_what_a_secret_lacks() -> None:
    secret = {"metadata": {"name": "keys"}, "data": {"client.public": base64.b64encode(b"x").decode()}}
    with pytest.raises(ValueError, match=re.escape("keys lacks client.secret, server.public")):
        client_keys(secret)


def test_token_secret_holds_the_token_under_its_key() -> None:
    secret = builders.build_token_secret(SESSION, spec_of("named-secrets"), "s3cret")
    assert base64.b64decode(secret["data"]["t"]) == b"s3cret"


@pytest.mark.parametrize(
    ("ip", "address"),
    [("10.0.0.7", "tcp://10.0.0.7:5555"), ("fd00::7", "tcp://[fd00::7]:5555")],
    ids=["ipv4", "ipv6"],
)
def test_worker_address(ip: str, address: str) -> None:
    assert builders.worker_address(ip) == address
