"""The operator logs in to a real cluster with kopf's own credential loaders (no cluster is needed to read
a kubeconfig, so this runs everywhere)."""

from __future__ import annotations

import logging
from pathlib import Path

import kopf
import pytest
import yaml

from hogwild.operator.handlers import cluster_login

KUBECONFIG = {
    "apiVersion": "v1",
    "kind": "Config",
    "clusters": [
        {"name": "c", "cluster": {"server": "https://10.0.0.1:6443", "insecure-skip-tls-verify": True}}
    ],
    "users": [{"name": "u", "user": {"token": "abc"}}],
    "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": "ml"}}],
    "current-context": "ctx",
}


def test_kubeconfig_login_is_used_outside_a_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(KUBECONFIG))
    monkeypatch.setenv("KUBECONFIG", str(path))
    info = cluster_login(settings=kopf.OperatorSettings(), logger=logging.getLogger("test"))
    assert info is not None
    assert (info.server, info.token, info.default_namespace) == ("https://10.0.0.1:6443", "abc", "ml")


def test_no_credentials_means_no_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cluster_login(settings=kopf.OperatorSettings(), logger=logging.getLogger("test")) is None
