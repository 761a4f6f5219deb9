"""spec.replicas on the operator's pure side: the pods and neighbours built per replica, the plan that
creates, removes and replaces replica pods, and the status of each replica. Tables of cases; every built
object goes through `kubernetes-validate --strict` as in tests/kube/test_builders.py.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from hogwild import defaults
from hogwild.operator import builders, diff, pod_builder, replicas
from hogwild.operator.spec import parse_spec
from hogwild.operator.status import PodFacts, WorkerFacts

SESSION = builders.SessionRef(name="chat", namespace="ml", uid="0f4c2a9e-1111-2222-3333-444455556666")
MODEL = {"model": {"path": "/models/tiny"}, "gpu": {"count": 0}}
KUBE_VERSIONS = ["1.33.0", "1.37.0"]
GROUP_ENV = {defaults.ENV_REPLICA, defaults.ENV_RENDEZVOUS, defaults.ENV_HOST_STORE}
RENDEZVOUS = f"replica-0.chat-replicas.ml.svc:{defaults.RENDEZVOUS_PORT}"


def pod(replica_count: int, ordinal: int, **extra: Any) -> dict[str, Any]:
    return pod_builder.build_pod(SESSION, parse_spec({**MODEL, "replicas": replica_count, **extra}), ordinal)


def trainer_env(p: dict[str, Any]) -> dict[str, str]:
    trainer = next(c for c in p["spec"]["containers"] if c["name"] == "trainer")
    return {e["name"]: e.get("value", "") for e in trainer["env"]}


# ---- builders -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("replica_count", "ordinal", "name", "env"),
    [
        (1, 0, "chat", {}),
        (2, 0, "chat", {"HOGWILD_REPLICA": "0", "HOGWILD_RENDEZVOUS": RENDEZVOUS, "HOGWILD_HOST_STORE": "1"}),
        (2, 1, "chat-1", {"HOGWILD_REPLICA": "1", "HOGWILD_RENDEZVOUS": RENDEZVOUS}),
        (12, 11, "chat-11", {"HOGWILD_REPLICA": "11", "HOGWILD_RENDEZVOUS": RENDEZVOUS}),
    ],
    ids=["one-replica", "two-replica-0", "two-replica-1", "twelve-replica-11"],
)
def test_replica_pod_names_labels_and_group_env(
    replica_count: int, ordinal: int, name: str, env: dict[str, str]
) -> None:
    built = pod(replica_count, ordinal)
    assert built["metadata"]["name"] == name
    assert built["metadata"]["labels"][builders.LABEL_REPLICA] == str(ordinal)
    assert built["metadata"]["labels"][builders.LABEL_INSTANCE] == "chat"
    assert {k: v for k, v in trainer_env(built).items() if k in GROUP_ENV} == env
    spec = built["spec"]
    # Every pod has its DNS name under the headless Service: one built for one replica joins in place.
    assert (spec["hostname"], spec["subdomain"]) == (f"replica-{ordinal}", "chat-replicas")
    if replica_count == 1:  # no placement: nothing to keep together or spread yet
        assert not {"topologySpreadConstraints", "affinity"} & set(spec)
    assert pod_builder.group_member(built) is (replica_count > 1)
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(built, version, strict=True)


SAME_SESSION = {"matchLabels": {builders.LABEL_INSTANCE: "chat"}}
SPREAD = {
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": SAME_SESSION,
        }
    ]
}
TOGETHER = {
    "affinity": {
        "podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": SAME_SESSION, "topologyKey": "kubernetes.io/hostname"}
            ]
        }
    }
}


@pytest.mark.parametrize(
    ("replica_count", "storage", "placement"),
    [
        (1, {}, {}),
        (2, {}, TOGETHER),
        (2, {"accessMode": "ReadWriteOnce"}, TOGETHER),
        (2, {"accessMode": "ReadWriteMany"}, SPREAD),
        (2, {"existingClaim": "shared"}, SPREAD),
        (1, {"accessMode": "ReadWriteMany"}, {}),
    ],
    ids=["one", "rwo-default", "rwo", "rwx", "existing-claim", "one-rwx"],
)
def test_placement_follows_the_checkpoint_volume(
    replica_count: int, storage: dict[str, Any], placement: dict[str, Any]
) -> None:
    """A ReadWriteOnce volume attaches to one node: its replicas stay there; others spread across nodes."""
    built = pod(replica_count, 1 if replica_count > 1 else 0, checkpoint={"storage": storage})
    found = {k: built["spec"][k] for k in ("affinity", "topologySpreadConstraints") if k in built["spec"]}
    assert found == placement
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(built, version, strict=True)


def test_one_replica_pod_equals_the_pod_before_replicas_apart_from_its_label() -> None:
    before = pod_builder.build_pod(SESSION, parse_spec(MODEL))
    now = pod(1, 0)
    assert now["spec"] == before["spec"]
    del (
        now["metadata"]["labels"][builders.LABEL_REPLICA],
        before["metadata"]["labels"][builders.LABEL_REPLICA],
    )
    assert now == before


@pytest.mark.parametrize(("before", "after"), [(1, 2), (2, 1), (2, 5), (5, 64)], ids=str)
def test_a_change_of_replicas_changes_no_pods_hash_and_restarts_nothing(before: int, after: int) -> None:
    for ordinal in range(min(before, after)):
        old, new = pod(before, ordinal), pod(after, ordinal)
        key = pod_builder.POD_HASH_ANNOTATION
        assert old["metadata"]["annotations"][key] == new["metadata"]["annotations"][key]
        assert pod_builder.pod_hash(old) == old["metadata"]["annotations"][key]
    change = diff.diff_specs(
        parse_spec({**MODEL, "replicas": before}), parse_spec({**MODEL, "replicas": after})
    )
    assert (change.restart, dict(change.hot), change.operator) == ((), {}, ("spec.replicas",))


def test_every_replica_of_a_spec_has_one_hash_and_a_restart_field_changes_it() -> None:
    hashes = {pod(3, i)["metadata"]["annotations"][pod_builder.POD_HASH_ANNOTATION] for i in range(3)}
    assert len(hashes) == 1
    changed = pod(3, 1, images={"vllm": "reg/vllm:2"})["metadata"]["annotations"][
        pod_builder.POD_HASH_ANNOTATION
    ]
    assert changed not in hashes


def test_replica_names_never_collide_with_the_sessions_other_children() -> None:
    spec = parse_spec({**MODEL, "replicas": 64})
    n = builders.names(SESSION, spec)
    others = {n.config, n.pvc, n.token_secret, n.curve_secret, n.replicas_service}
    pods = {builders.pod_name(SESSION, i) for i in range(64)}
    assert len(pods) == 64 and not pods & others


@pytest.mark.parametrize(("replica_count", "budget"), [(1, False), (2, True), (64, True)])
def test_headless_service_always_and_budget_with_more_than_one(replica_count: int, budget: bool) -> None:
    spec = parse_spec({**MODEL, "replicas": replica_count})
    headless = builders.build_replicas_service(SESSION, spec)
    assert headless is not None
    assert headless["metadata"]["name"] == "chat-replicas"
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["ports"][0]["port"] == defaults.RENDEZVOUS_PORT
    assert headless["spec"]["selector"] == builders.selector_labels(SESSION)
    pdb = builders.build_disruption_budget(SESSION, spec)
    assert (pdb is not None) is budget
    objects = [headless, *([pdb] if pdb else [])]
    if pdb is not None:
        assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"] == {"matchLabels": builders.selector_labels(SESSION)}
    # The client Service selects by instance: it balances over every replica.
    assert builders.build_service(SESSION, spec)["spec"]["selector"] == builders.selector_labels(SESSION)
    for obj in objects:
        assert obj["metadata"]["ownerReferences"][0]["uid"] == SESSION.uid
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize(
    ("source", "port", "allowed"),
    [
        ("anywhere", defaults.VLLM_HTTP_PORT, True),  # the OpenAI API and /train (token)
        ("anywhere", defaults.WORKER_METRICS_PORT, True),  # Prometheus
        ("anywhere", defaults.WORKER_CONTROL_PORT, True),  # the operator (CURVE)
        ("anywhere", defaults.RENDEZVOUS_PORT, False),  # the group's store authenticates nothing
        ("anywhere", 41234, False),  # a gloo connection
        ("session", defaults.RENDEZVOUS_PORT, True),
        ("session", 41234, True),
        ("other session", defaults.RENDEZVOUS_PORT, False),
    ],
)
def test_the_network_policy_keeps_the_group_ports_among_the_sessions_pods(
    source: str, port: int, allowed: bool
) -> None:
    policy = builders.build_network_policy(SESSION, parse_spec(MODEL))
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": builders.selector_labels(SESSION)}
    assert spec["policyTypes"] == ["Ingress"]
    labels = {
        "anywhere": {},
        "session": builders.selector_labels(SESSION),
        "other session": {**builders.selector_labels(SESSION), builders.LABEL_INSTANCE: "other"},
    }[source]

    def admits(rule: dict[str, Any]) -> bool:
        # NetworkPolicy semantics: a rule admits when every peer list it has matches (absent: any).
        ports = rule.get("ports")
        peers = rule.get("from")
        port_ok = ports is None or any(p["port"] == port for p in ports)
        peer_ok = peers is None or any(
            all(labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items()) for peer in peers
        )
        return port_ok and peer_ok

    assert any(admits(rule) for rule in spec["ingress"]) is allowed
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(policy, version, strict=True)


def test_a_name_too_long_for_the_suffix_gets_no_headless_service_and_no_dns_name() -> None:
    long = builders.SessionRef(name="c" * 55, namespace="ml", uid="u")
    assert builders.build_replicas_service(long, parse_spec(MODEL)) is None
    assert not {"hostname", "subdomain"} & set(pod_builder.build_pod(long, parse_spec(MODEL))["spec"])


@pytest.mark.parametrize(
    ("storage", "modes"),
    [({}, ["ReadWriteOnce"]), ({"accessMode": "ReadWriteMany"}, ["ReadWriteMany"])],
    ids=["default", "rwx"],
)
def test_checkpoint_access_mode(storage: dict[str, Any], modes: list[str]) -> None:
    spec = parse_spec({**MODEL, "replicas": 2, "checkpoint": {"storage": storage}})
    pvc = builders.build_pvc(SESSION, spec)
    assert pvc is not None and pvc["spec"]["accessModes"] == modes


# ---- the plan -----------------------------------------------------------------------------------------
H = "hash-now"


def found(
    ordinal: int,
    *,
    hash_: str = H,
    phase: str = "Running",
    ready: bool = True,
    member: bool = True,
    ours: bool = True,
    terminating: bool = False,
    dns_name: bool = True,
) -> replicas.Found:
    facts = PodFacts(
        name=builders.pod_name(SESSION, ordinal),
        phase=phase,
        terminating=terminating,
        vllm_ready=ready,
        trainer_running=phase == "Running",
        pod_hash=hash_,
        dns_name=dns_name,
    )
    return replicas.Found(ordinal, facts, ours=ours, member=member)


PLANS = [
    # (id, replicas, found, expected plan)
    ("create-first", 1, [], replicas.Plan(create=(0,))),
    ("steady-one", 1, [found(0, member=False)], replicas.Plan()),
    ("scale-up-1-2", 2, [found(0, member=False, ready=True)], replicas.Plan(create=(1,))),
    # built for one replica: it joins in place (its worker is told to), never replaced for it
    ("joins-in-place", 2, [found(0, member=False), found(1)], replicas.Plan()),
    # built by an older operator (no DNS name): replaced to join, once another replica serves
    (
        "old-pod-replaced-once-another-serves",
        2,
        [found(0, member=False, dns_name=False), found(1)],
        replicas.Plan(replace=(0,), join=True),
    ),
    (
        "old-pod-kept-while-it-serves-alone",
        2,
        [found(0, member=False, dns_name=False), found(1, ready=False)],
        replicas.Plan(),
    ),
    ("scale-up-2-4", 4, [found(0), found(1)], replicas.Plan(create=(2, 3))),
    ("scale-down-4-1", 1, [found(0), found(1), found(2), found(3)], replicas.Plan(remove=(3, 2, 1))),
    ("member-stays-at-one", 1, [found(0, member=True)], replicas.Plan()),
    (
        "restart-all-checkpoint-through-0",
        3,
        [found(0, hash_="old"), found(1, hash_="old"), found(2, hash_="old")],
        replicas.Plan(replace=(0, 1, 2)),
    ),
    (
        "restart-through-a-running-one",
        2,
        [found(0, hash_="old", phase="Pending"), found(1, hash_="old")],
        replicas.Plan(replace=(1, 0)),
    ),
    ("ended-replica-alone", 3, [found(0), found(1, phase="Failed"), found(2)], replicas.Plan(replace=(1,))),
    ("terminating-waits", 2, [found(0), found(1, terminating=True)], replicas.Plan(waiting=(1,))),
    ("removing-already", 1, [found(0), found(1, terminating=True)], replicas.Plan()),
    ("foreign-name", 2, [found(0), found(1, ours=False)], replicas.Plan(blocked=(1,))),
    ("foreign-never-removed", 1, [found(0), found(1, ours=False)], replicas.Plan()),
    ("gap-filled", 3, [found(0), found(2)], replicas.Plan(create=(1,))),
]


@pytest.mark.parametrize(("count", "pods", "expected"), [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_plan(count: int, pods: list[replicas.Found], expected: replicas.Plan) -> None:
    assert replicas.plan(count, {f.ordinal: f for f in pods}, H) == expected


# ---- the status ---------------------------------------------------------------------------------------
def group(state: str = "formed", in_sync: bool | None = True, **extra: Any) -> dict[str, Any]:
    return {"replica": 0, "state": state, "rank": 0, "size": 2, "members": [0, 1], "epoch": 3,
            "in_sync": in_sync, "digest": "d1", **extra}  # fmt: skip


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ({}, None),
        ({"group": "formed"}, None),
        (
            {"group": group()},
            replicas.Group("formed", 0, 2, 3, (0, 1), True, "d1"),
        ),
        (
            {"group": {"state": 3, "rank": True, "size": "2", "members": [0, "x"], "in_sync": "yes"}},
            replicas.Group(None, None, None, None, (0,), None, None),
        ),
    ],
    ids=["old-worker", "not-an-object", "full", "malformed-fields"],
)
def test_group_is_read_defensively(reply: dict[str, Any], expected: replicas.Group | None) -> None:
    assert replicas.group_of(reply) == expected


def seen(ordinal: int, *, ready: bool = True, step: int | None = 7, group_reply: Any = None,
         connected: bool = True, pod_: bool = True, message: str | None = None) -> replicas.Replica:  # fmt: skip
    facts = (
        PodFacts(name=builders.pod_name(SESSION, ordinal), phase="Running", vllm_ready=ready)
        if pod_
        else None
    )
    worker = None if step is None else WorkerFacts(connected=connected, step=step)
    g = replicas.group_of({"group": group_reply}) if group_reply is not None else None
    return replicas.Replica(
        ordinal, facts, worker, version=f"L.{step}" if step else None, group=g, message=message
    )


STATUSES = [
    # (id, desired, seen, (replicas, ready, inSync), entry fields of replica 0)
    ("one-connected", 1, [seen(0)], (1, 1, 1), {"inSync": True, "step": 7, "weightsVersion": "L.7"}),
    ("one-not-mapped", 1, [seen(0, connected=False)], (1, 1, 0), {"inSync": False}),
    ("one-old-worker-unknown", 1, [seen(0, step=None)], (1, 1, 0), {"ready": True}),
    (
        "two-in-sync",
        2,
        [seen(0, group_reply=group()), seen(1, group_reply=group(rank=1))],
        (2, 2, 2),
        {"inSync": True, "groupState": "formed", "rank": 0, "groupSize": 2, "groupEpoch": 3},
    ),
    (
        "two-one-out-of-sync",
        2,
        [seen(0, group_reply=group()), seen(1, group_reply=group(in_sync=False))],
        (2, 2, 1),
        {"inSync": True},
    ),
    (
        "two-one-alone",
        2,
        [
            seen(0, group_reply=group(state="alone", in_sync=None)),
            seen(1, group_reply=group(state="forming")),
        ],
        (2, 2, 0),
        {"inSync": False, "groupState": "alone"},
    ),
    (
        "not-ready-is-not-counted-in-sync",
        2,
        [seen(0, group_reply=group()), seen(1, ready=False, group_reply=group())],
        (2, 1, 1),
        {"inSync": True},
    ),
    (
        "missing-pod",
        2,
        [seen(0, group_reply=group()), seen(1, pod_=False, step=None, message="waiting")],
        (1, 1, 1),
        {"inSync": True},
    ),
]


@pytest.mark.parametrize(
    ("desired", "replicas_seen", "counts", "entry0"), [s[1:] for s in STATUSES], ids=[s[0] for s in STATUSES]
)
def test_replica_status(
    desired: int, replicas_seen: list[replicas.Replica], counts: tuple[int, int, int], entry0: dict[str, Any]
) -> None:
    out = replicas.replica_status(desired, replicas_seen, None)
    assert (out["replicas"], out["readyReplicas"], out["inSyncReplicas"]) == counts
    assert [e["replica"] for e in out["replicaStatuses"]] == sorted(r.ordinal for r in replicas_seen)
    first = out["replicaStatuses"][0]
    assert {k: first.get(k) for k in entry0} == entry0
    assert first["pod"] == "chat"


def test_replica_entry_keeps_what_the_worker_last_said_until_it_says_otherwise() -> None:
    previous = [{"replica": 1, "pod": "chat-1", "step": 5, "weightsVersion": "L.5", "inSync": True}]
    unasked = replicas.replica_status(2, [seen(0), seen(1, step=None)], previous)["replicaStatuses"][1]
    assert (unasked["step"], unasked["weightsVersion"], unasked["inSync"]) == (5, "L.5", True)
    gone = replicas.replica_status(2, [seen(0), seen(1, step=None, pod_=False)], previous)["replicaStatuses"][
        1
    ]
    assert gone["podPhase"] == "Missing" and "inSync" not in gone and gone["pod"] == "chat-1"


# ---- operator metrics per replica ---------------------------------------------------------------------
def test_replica_metrics_follow_the_status_and_forget_removed_replicas() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from hogwild.operator.metrics import OperatorMetrics

    def samples(metrics: OperatorMetrics) -> dict[tuple[str, str], float]:
        out = {}
        for family in text_string_to_metric_families(metrics.render().decode()):
            for s in family.samples:
                if s.name.startswith("hogwild_operator_replica"):
                    out[(s.name, s.labels.get("replica") or s.labels.get("state", ""))] = s.value
        return out

    metrics = OperatorMetrics()
    two = replicas.replica_status(
        2, [seen(0, group_reply=group()), seen(1, ready=False, group_reply=group(in_sync=False))], None
    )
    metrics.set_replicas("ml", "chat", 2, two)
    got = samples(metrics)
    assert got[("hogwild_operator_replicas", "desired")] == 2
    assert got[("hogwild_operator_replicas", "ready")] == 1
    assert got[("hogwild_operator_replica_ready", "1")] == 0
    assert got[("hogwild_operator_replica_in_sync", "0")] == 1
    metrics.set_replicas("ml", "chat", 1, replicas.replica_status(1, [seen(0)], None))
    got = samples(metrics)
    assert ("hogwild_operator_replica_ready", "1") not in got
    assert got[("hogwild_operator_replicas", "desired")] == 1
