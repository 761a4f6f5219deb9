"""What a worker makes of the replica environment the operator and local mode give it, and the CLI's checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hogwild.testing.children import child_env
from hogwild.worker.group.settings import GroupSettings


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),  # one replica: no group, the worker trains alone
        ({"HOGWILD_RENDEZVOUS": "  "}, None),
        (
            {"HOGWILD_RENDEZVOUS": "replica-0.chat-replicas.ml.svc:29500", "HOGWILD_REPLICA": "2"},
            GroupSettings(replica=2, rendezvous="replica-0.chat-replicas.ml.svc:29500"),
        ),
        (
            {
                "HOGWILD_RENDEZVOUS": "127.0.0.1:29500",
                "HOGWILD_HOST_STORE": "1",
                "HOGWILD_GROUP_SETTLE_S": "0.5",
            },
            GroupSettings(replica=0, rendezvous="127.0.0.1:29500", host_store=True, settle_s=0.5),
        ),
        ({"HOGWILD_RENDEZVOUS": "[::1]:29500"}, GroupSettings(replica=0, rendezvous="[::1]:29500")),
    ],
)
def test_settings_from_env(env: dict[str, str], expected: GroupSettings | None) -> None:
    assert GroupSettings.from_env(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HOGWILD_RENDEZVOUS": "no-port"}, "is not host:port"),
        ({"HOGWILD_RENDEZVOUS": "host:port"}, "is not host:port"),
        ({"HOGWILD_RENDEZVOUS": "h:1", "HOGWILD_REPLICA": "one"}, "is not a replica ordinal"),
        ({"HOGWILD_RENDEZVOUS": "h:1", "HOGWILD_REPLICA": "-1"}, "is not a replica ordinal"),
    ],
)
def test_bad_settings_say_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GroupSettings.from_env(env)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            ["worker", "--metrics-port", "0", "--control-port", "0"],
            {"HOGWILD_REPLICA": "x", "HOGWILD_RENDEZVOUS": "h:1"},
            "bad replica settings",
        ),
        (["serve", "--model", "m", "--replicas", "0"], {}, "--replicas must be at least 1"),
        (
            ["serve", "--model", "m", "--replicas", "2", "--mps-trainer-share", "50"],
            {},
            "--mps-trainer-share runs one replica",
        ),
    ],
)
def test_the_cli_refuses_bad_replica_arguments(
    argv: list[str], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "hogwild.cli",
            *argv,
            *(["--run-dir", str(tmp_path)] if argv[0] == "worker" else []),
        ],
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert message in run.stderr + run.stdout
