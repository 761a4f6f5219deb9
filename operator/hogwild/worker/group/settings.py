"""Which replica group a worker belongs to, from the environment the operator (or `hogwild serve --replicas`)
gives it: its ordinal, the rendezvous store's address, and whether it hosts the store."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from hogwild import defaults
from hogwild.worker.group import rendezvous


@dataclass(frozen=True)
class GroupSettings:
    replica: int
    rendezvous: str  # host:port of the store
    host_store: bool = False
    settle_s: float = 2.0  # how long an epoch stays open for others to register
    timeout_s: float = 300.0  # a collective waiting longer than this breaks the group (a hung member)
    idle_s: float = 0.05  # the idle exchange's period
    tensor_backend: str = "auto"  # gradients and weights: "auto" (gloo on CPU, NCCL on CUDA) or "gloo"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GroupSettings | None:
        """The group this worker belongs to, or None: no rendezvous named, a lone worker (one replica)."""
        address = env.get(defaults.ENV_RENDEZVOUS, "").strip()
        if not address:
            return None
        rendezvous.split_address(address)  # ValueError early, with the address in it
        replica_text = env.get(defaults.ENV_REPLICA, "0").strip()
        if not replica_text.isdigit():
            raise ValueError(f"{defaults.ENV_REPLICA}={replica_text!r} is not a replica ordinal (0, 1, ...)")
        return cls(
            replica=int(replica_text),
            rendezvous=address,
            host_store=env.get(defaults.ENV_HOST_STORE, "") == "1",
            settle_s=float(env.get("HOGWILD_GROUP_SETTLE_S", "2.0")),
            timeout_s=float(env.get("HOGWILD_GROUP_TIMEOUT_S", "300")),
            tensor_backend=env.get("HOGWILD_GROUP_TENSOR_BACKEND", "auto"),
        )


def settings_to_join(replica: int, address: str, host_store: bool) -> GroupSettings:
    """The settings a join message names (a pod built for one replica joins on a scale-up), with this
    process's HOGWILD_GROUP_* tunables, as if the pod had been started with the group's environment."""
    env = {
        **os.environ,
        defaults.ENV_REPLICA: str(replica),
        defaults.ENV_RENDEZVOUS: address,
        defaults.ENV_HOST_STORE: "1" if host_store else "",
    }
    settings = GroupSettings.from_env(env)
    assert settings is not None  # the rendezvous is set
    return settings


def settings_from_env() -> GroupSettings | None:
    return GroupSettings.from_env(os.environ)
