"""The operator's side of safe online learning: spec.rollback, spec.training.gate.evalConfigMap, and what
the status and Events say about versions, reverts and rollbacks. Pure: no I/O.

- `spec.rollback {id, to}` is one-shot and idempotent: the operator relays it once per id (when
  status.rollback.id differs), and records the outcome there and in an Event. A rollback the worker refused
  as impossible (unknown version) is recorded as Failed and not retried; one it could not take now (busy,
  not connected) is tried again on the next reconcile.
- `spec.training.gate.evalConfigMap` names a ConfigMap whose key holds the evaluation set as JSON lines; the
  operator relays its samples with configure whenever the worker holds another set (their digests differ: a
  changed ConfigMap, or a new pod whose worker holds none), and whenever the gate is relayed.
- The worker's status reply carries the version, the lineage and the gate's counts; a rise of the revert
  count since the last status write is one Warning Event per observation, naming the rejected version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hogwild.operator import fields
from hogwild.operator.fields import SpecError
from hogwild.protocol import (
    ProtocolError,
    RollbackReply,
    Sample,
    StatusReply,
    decode_samples,
    parse_json,
    samples_digest,
)
from hogwild.versions import Target, TargetError, parse_target

DEFAULT_EVAL_KEY = "eval.jsonl"
# Worker errors after which a rollback is recorded as Failed (asking again would fail again).
FINAL_ROLLBACK_ERRORS = frozenset({"not_found", "invalid", "bad_request"})


@dataclass(frozen=True)
class RollbackSpec:
    id: str
    to: str

    def target(self) -> Target:
        return parse_target(int(self.to) if self.to.isdigit() else self.to)


@dataclass(frozen=True)
class ConfigMapRef:
    name: str
    key: str = DEFAULT_EVAL_KEY


def parse_rollback(raw: Any) -> RollbackSpec | None:
    where = "spec.rollback"
    if raw is None:
        return None
    value = fields.obj(where, raw)
    fields.known(where, value, {"id", "to"})
    spec = RollbackSpec(
        id=fields.string(f"{where}.id", value.get("id"), required=True),
        to=str(value.get("to")) if isinstance(value.get("to"), int | str) else "",
    )
    try:
        spec.target()
    except TargetError as err:
        raise SpecError(f"{where}.to: {err}") from None
    return spec


def parse_eval_config_map(raw_gate: Any) -> ConfigMapRef | None:
    where = "spec.training.gate.evalConfigMap"
    gate = fields.obj("spec.training.gate", raw_gate)
    if gate.get("evalConfigMap") is None:
        return None
    if gate.get("evalFile"):
        raise SpecError("spec.training.gate: set evalFile or evalConfigMap, not both")
    value = fields.obj(where, gate["evalConfigMap"])
    fields.known(where, value, {"name", "key"})
    return ConfigMapRef(
        name=fields.string(f"{where}.name", value.get("name"), required=True),
        key=fields.string(f"{where}.key", value.get("key"), DEFAULT_EVAL_KEY),
    )


# ---- the evaluation set from a ConfigMap --------------------------------------------------------------------
def eval_samples_of(
    config_map: Mapping[str, Any] | None, ref: ConfigMapRef
) -> tuple[tuple[Sample, ...], str]:
    """(samples, their digest) of the ConfigMap's key. Raises ValueError saying what is wrong."""
    if config_map is None:
        raise ValueError(f"ConfigMap {ref.name} (spec.training.gate.evalConfigMap) does not exist")
    text = (config_map.get("data") or {}).get(ref.key)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"ConfigMap {ref.name} has no samples under key {ref.key} (an empty evaluation set)")
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        values = [parse_json(line, f"{ref.name}/{ref.key} line {i + 1}") for i, line in enumerate(lines)]
        samples = decode_samples(f"ConfigMap {ref.name}/{ref.key}", values)
    except ProtocolError as err:
        raise ValueError(err.message) from None
    return samples, samples_digest(samples)


def worker_eval_digest(reply: StatusReply) -> str | None:
    """The digest of the evaluation set the worker holds, from its status reply (None: none, or not said)."""
    gate = reply.get("gate")
    eval_set = gate.get("eval_set") if isinstance(gate, Mapping) else None
    digest = eval_set.get("digest") if isinstance(eval_set, Mapping) else None
    return digest if isinstance(digest, str) else None


# ---- rollback bookkeeping ----------------------------------------------------------------------------------
def rollback_due(spec: RollbackSpec | None, status: Mapping[str, Any]) -> bool:
    done = status.get("rollback") or {}
    return spec is not None and done.get("id") != spec.id


def rollback_record(
    spec: RollbackSpec, reply: RollbackReply | None, error: str | None, now: str
) -> dict[str, Any]:
    """status.rollback for a finished request: what the worker restored, or why it could not."""
    if reply is None:
        return {"id": spec.id, "to": spec.to, "result": "Failed", "message": error or "failed", "time": now}
    restored = reply.get("restored") or {}
    what = restored.get("version") or f"checkpoint step {restored.get('step')}"
    message = (
        f"restored {what} ({restored.get('kind')}) in {reply.get('seconds')} s; "
        f"weights were {reply.get('from_version')}, now {reply.get('version')}"
    )
    return {
        "id": spec.id,
        "to": spec.to,
        "result": "Succeeded",
        "message": message,
        "version": str(reply.get("version") or ""),
        "time": now,
    }


def rollback_is_final(error: ProtocolError) -> bool:
    return error.code in FINAL_ROLLBACK_ERRORS


# ---- status and Events -------------------------------------------------------------------------------------
def _verdict_text(last: Mapping[str, Any] | None) -> str | None:
    if not isinstance(last, Mapping) or "verdict" not in last:
        return None

    def loss(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, int | float) else "not finite"

    text = (
        f"{last['verdict']}: held-out loss {loss(last.get('loss_before'))} -> {loss(last.get('loss_after'))}"
    )
    if last.get("rejected_version"):
        text += f" ({last['rejected_version']} rejected, live {last.get('visible_s')} s)"
    return text


def safety_status(reply: StatusReply) -> dict[str, Any]:
    """weightsVersion, lineage and gate for the status, from the worker's status reply (only what it said)."""
    out: dict[str, Any] = {}
    if isinstance(reply.get("version"), str):
        out["weightsVersion"] = reply["version"]
    lineage = reply.get("lineage")
    if isinstance(lineage, Mapping) and isinstance(lineage.get("origin"), str):
        out["lineage"] = lineage["origin"]
    gate = reply.get("gate")
    if isinstance(gate, Mapping):
        counts = {k: gate.get(k) for k in ("evaluations", "reverts") if isinstance(gate.get(k), int)}
        verdict = _verdict_text(gate.get("last"))
        out["gate"] = {**counts, **({"lastVerdict": verdict} if verdict else {})}
    return out


def safety_events(previous: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) Events for what changed between two statuses: reverts by the gate."""
    events = []
    was = (previous.get("gate") or {}).get("reverts")
    now = (new.get("gate") or {}).get("reverts")
    # A lower count is a restarted worker (counts start again), not a revert.
    if isinstance(now, int) and isinstance(was, int) and now > was:
        what = (new.get("gate") or {}).get("lastVerdict") or "an update broke the evaluation policy"
        count = f"{now - was} updates" if now - was > 1 else "an update"
        events.append(
            ("Warning", "Reverted", f"the gate reverted {count}: {what}; serving {new.get('weightsVersion')}")
        )
    return events
