"""Every message between the vLLM router, the operator and the training worker.

A message is one JSON object, UTF-8 encoded, in one ZMQ frame:

    request: {"v": 1, "type": "train", "id": "...", ...fields}
    reply:   {"v": 1, "id": "...", "ok": true, ...fields}
             {"v": 1, "id": "...", "ok": false, "error": {"code": "...", "message": "...", "status": 422}}

Requests are decoded into frozen dataclasses and validated here, on receipt: a malformed, unknown or
wrong-version message raises ProtocolError, which the receiver turns into an error reply (never a crash).
The `/train` HTTP body is exactly the train message's fields. Pure: no sockets, no I/O.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from hogwild import defaults
from hogwild.config import ConfigError, validate_changes

# The protocol's face: the errors (hogwild.errors), the reply shapes (hogwild.replies) and the sample schema
# (hogwild.samples) live apart, and are imported from here by whoever speaks the protocol.
from hogwild.errors import ERROR_STATUS as ERROR_STATUS
from hogwild.errors import MAX_ERROR_MESSAGE_CHARS as MAX_ERROR_MESSAGE_CHARS
from hogwild.errors import ProtocolError as ProtocolError
from hogwild.replies import CheckpointReply as CheckpointReply
from hogwild.replies import CheckpointSummary as CheckpointSummary
from hogwild.replies import ConfigureReply as ConfigureReply
from hogwild.replies import Endpoints as Endpoints
from hogwild.replies import GatedTrainReply as GatedTrainReply
from hogwild.replies import JoinReply as JoinReply
from hogwild.replies import Reply as Reply
from hogwild.replies import Restored as Restored
from hogwild.replies import RestoreReply as RestoreReply
from hogwild.replies import RollbackReply as RollbackReply
from hogwild.replies import SafetyStatus as SafetyStatus
from hogwild.replies import StatusReply as StatusReply
from hogwild.replies import TrainReply as TrainReply
from hogwild.replies import TrainSteps as TrainSteps
from hogwild.samples import CHAT_ROLES as CHAT_ROLES
from hogwild.samples import SAMPLE_KINDS as SAMPLE_KINDS
from hogwild.samples import Sample as Sample
from hogwild.samples import decode_sample as decode_sample
from hogwild.samples import decode_samples as decode_samples
from hogwild.samples import encode_sample as encode_sample
from hogwild.samples import samples_digest as samples_digest
from hogwild.versions import Target, TargetError, parse_target

PROTOCOL_VERSION = 1


# ---- requests -----------------------------------------------------------------------------------------
def _positive_int(where: str, value: Any, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ProtocolError("invalid", f"{where} must be a whole number from 1 to {high}, got {value!r}")
    return value


def _timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolError("invalid", f"timeout_s must be a number of seconds, got {value!r}")
    if not 0 < value <= defaults.MAX_TRAIN_TIMEOUT_S:
        raise ProtocolError("invalid", f"timeout_s must be in (0, {defaults.MAX_TRAIN_TIMEOUT_S:.0f}]")
    return float(value)


def _no_unknown(kind: str, body: Mapping[str, Any], known: set[str]) -> None:
    unknown = set(body) - known
    if unknown:
        raise ProtocolError(
            "invalid",
            f"{kind}: unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(known))}",
        )


ReplyT_co = TypeVar("ReplyT_co", covariant=True)


class Answered(Generic[ReplyT_co]):
    """A request, and the shape of the `ok` reply it gets (hogwild.replies): the client's `request` of a
    TrainRequest is typed as a TrainReply. The type parameter exists for type checkers only."""

    type: ClassVar[str]

    def to_body(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class TrainRequest(Answered[TrainReply]):
    """Train on `samples` for `steps` optimizer steps. The reply carries step, loss and tokens."""

    type: ClassVar[str] = "train"
    samples: tuple[Sample, ...]
    steps: int = 1
    timeout_s: float = defaults.DEFAULT_TRAIN_TIMEOUT_S

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> TrainRequest:
        _no_unknown("train", body, {"samples", "steps", "timeout_s"})
        samples = body.get("samples")
        if not isinstance(samples, list) or not samples:
            raise ProtocolError("invalid", "samples must be a non-empty list")
        if len(samples) > defaults.MAX_SAMPLES_PER_REQUEST:
            raise ProtocolError(
                "too_large",
                f"at most {defaults.MAX_SAMPLES_PER_REQUEST} samples per request, got {len(samples)}",
            )
        return cls(
            samples=tuple(decode_sample(f"samples[{i}]", s) for i, s in enumerate(samples)),
            steps=_positive_int("steps", body.get("steps", 1), defaults.MAX_STEPS_PER_REQUEST),
            timeout_s=_timeout(body.get("timeout_s", defaults.DEFAULT_TRAIN_TIMEOUT_S)),
        )

    def to_body(self) -> dict[str, Any]:
        return {
            "samples": [encode_sample(s) for s in self.samples],
            "steps": self.steps,
            "timeout_s": self.timeout_s,
        }


@dataclass(frozen=True)
class CheckpointRequest(Answered[CheckpointReply]):
    """Write a checkpoint now. `reason` is recorded in meta.json (e.g. "request", "pre-restart", "delete")."""

    type: ClassVar[str] = "checkpoint"
    reason: str = "request"

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> CheckpointRequest:
        _no_unknown("checkpoint", body, {"reason"})
        reason = body.get("reason", "request")
        if not isinstance(reason, str) or not 0 < len(reason) <= 64:
            raise ProtocolError("invalid", "reason must be a short string")
        return cls(reason=reason)

    def to_body(self) -> dict[str, Any]:
        return {"reason": self.reason}


@dataclass(frozen=True)
class StatusRequest(Answered[StatusReply]):
    type: ClassVar[str] = "status"

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> StatusRequest:
        _no_unknown("status", body, set())
        return cls()

    def to_body(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class ConfigureRequest(Answered[ConfigureReply]):
    """Change hyperparameters (snake_case names of hogwild.config). The reply says `state_reset`.

    `eval_samples`, when given, replaces the evaluation gate's held-out set (hogwild.config.EvalGate)."""

    type: ClassVar[str] = "configure"
    changes: Mapping[str, Any] = field(default_factory=dict)
    eval_samples: tuple[Sample, ...] | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ConfigureRequest:
        _no_unknown("configure", body, {"changes", "eval_samples"})
        try:
            changes = validate_changes(body.get("changes", {}))
        except ConfigError as err:
            raise ProtocolError("invalid", str(err)) from None
        samples = body.get("eval_samples")
        if samples is not None:
            samples = decode_samples("eval_samples", samples)
        return cls(changes=changes, eval_samples=samples)

    def to_body(self) -> dict[str, Any]:
        changes = dict(self.changes)
        for nested in ("protection", "gate"):
            if nested in changes and not isinstance(changes[nested], Mapping):
                changes[nested] = vars(changes[nested]).copy()
        if "betas" in changes:
            changes["betas"] = list(changes["betas"])
        body: dict[str, Any] = {"changes": changes}
        if self.eval_samples is not None:
            body["eval_samples"] = [encode_sample(s) for s in self.eval_samples]
        return body


@dataclass(frozen=True)
class RestoreRequest(Answered[RestoreReply]):
    """Roll the served weights (and optimizer state) back to a checkpoint: the newest when `step` is None."""

    type: ClassVar[str] = "restore"
    step: int | None = None
    weights: bool = True
    optimizer: bool = True

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> RestoreRequest:
        _no_unknown("restore", body, {"step", "weights", "optimizer"})
        step = body.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ProtocolError("invalid", f"step must be a checkpoint step number, got {step!r}")
        flags = {}
        for name in ("weights", "optimizer"):
            value = body.get(name, True)
            if not isinstance(value, bool):
                raise ProtocolError("invalid", f"{name} must be true or false")
            flags[name] = value
        if not any(flags.values()):
            raise ProtocolError("invalid", "nothing to restore: weights and optimizer are both false")
        return cls(step=step, **flags)

    def to_body(self) -> dict[str, Any]:
        return {"step": self.step, "weights": self.weights, "optimizer": self.optimizer}


@dataclass(frozen=True)
class RollbackRequest(Answered[RollbackReply]):
    """Put the served weights and the optimizer state back to a kept version (hogwild.versions.Target):
    `previous`, a version `<lineage>.<step>`, or a checkpoint step. The reply says what was restored.

    `request_id` makes it idempotent: the worker answers a repeat of the id it last applied with that
    rollback's reply (`repeated: true`) and changes nothing (the operator sends spec.rollback.id)."""

    type: ClassVar[str] = "rollback"
    to: Target
    request_id: str | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> RollbackRequest:
        _no_unknown("rollback", body, {"to", "request_id"})
        if "to" not in body:
            raise ProtocolError("invalid", "rollback needs 'to': 'previous', a version or a checkpoint step")
        request_id = body.get("request_id")
        if request_id is not None and (not isinstance(request_id, str) or not 0 < len(request_id) <= 64):
            raise ProtocolError("invalid", "request_id must be a string of 1 to 64 characters")
        try:
            return cls(to=parse_target(body["to"]), request_id=request_id)
        except TargetError as err:
            raise ProtocolError("invalid", str(err)) from None

    def to_body(self) -> dict[str, Any]:
        t = self.to
        body: dict[str, Any] = {
            "to": "previous" if t.previous else (t.version if t.version is not None else t.step)
        }
        if self.request_id is not None:
            body["request_id"] = self.request_id
        return body


@dataclass(frozen=True)
class JoinRequest(Answered[JoinReply]):
    """Join the session's replica group now: what a pod built for a group has in its environment
    (hogwild.worker.group.settings), sent by the operator to a running replica built for one, on a scale-up.
    Only the operator's control channel may send it (the worker refuses it on the vLLM socket)."""

    type: ClassVar[str] = "join"
    replica: int
    rendezvous: str  # host:port of the group's store
    host_store: bool = False

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> JoinRequest:
        _no_unknown("join", body, {"replica", "rendezvous", "host_store"})
        replica = body.get("replica")
        if isinstance(replica, bool) or not isinstance(replica, int) or not 0 <= replica < 1000:
            raise ProtocolError("invalid", f"replica must be a replica ordinal (0, 1, ...), got {replica!r}")
        address = body.get("rendezvous")
        host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
        if not isinstance(address, str) or not host or len(address) > 300 or not port.isdigit():
            raise ProtocolError("invalid", f"rendezvous must be host:port, got {address!r}")
        if not 0 < int(port) < 65536:
            raise ProtocolError("invalid", f"rendezvous port must be 1-65535, got {port}")
        host_store = body.get("host_store", False)
        if not isinstance(host_store, bool):
            raise ProtocolError("invalid", "host_store must be true or false")
        return cls(replica=replica, rendezvous=address, host_store=host_store)

    def to_body(self) -> dict[str, Any]:
        return {"replica": self.replica, "rendezvous": self.rendezvous, "host_store": self.host_store}


Request = (
    TrainRequest
    | CheckpointRequest
    | StatusRequest
    | ConfigureRequest
    | RestoreRequest
    | RollbackRequest
    | JoinRequest
)
REQUEST_TYPES: dict[str, type[Request]] = {
    cls.type: cls
    for cls in (
        TrainRequest,
        CheckpointRequest,
        StatusRequest,
        ConfigureRequest,
        RestoreRequest,
        RollbackRequest,
        JoinRequest,
    )
}
# Requests that change weights or training state: they need the token on HTTP.
WEIGHT_CHANGING = frozenset({"train", "checkpoint", "configure", "restore", "rollback"})
# Requests only the operator sends, over its CURVE channel; the worker refuses them on the vLLM socket.
CONTROL_ONLY = frozenset({"join"})


# ---- envelopes ----------------------------------------------------------------------------------------
def new_id() -> str:
    return uuid.uuid4().hex[:16]


def encode_request(request: Answered[object], request_id: str | None = None) -> bytes:
    envelope = {"v": PROTOCOL_VERSION, "type": request.type, "id": request_id or new_id()}
    envelope.update(request.to_body())
    # UTF-8, not \uXXXX escapes: a body within the HTTP limit stays within MAX_FRAME_BYTES. A lone surrogate
    # has no UTF-8 form; only then escape.
    try:
        return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(envelope, separators=(",", ":")).encode()


# Frames bigger than any valid request: the largest /train body plus room for the envelope. The router
# re-encodes bodies as UTF-8 (ensure_ascii=False), so a body never grows on its way to the worker.
MAX_FRAME_BYTES = defaults.MAX_TRAIN_BODY_BYTES + 64 * 1024


def parse_json(data: bytes | bytearray | str, what: str = "message") -> Any:
    """json.loads, with every way it can fail as a ProtocolError `bad_request` (never another exception).

    Deep nesting (100k `[`) makes Python's parser raise RecursionError, which is not a ValueError."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ProtocolError("bad_request", f"{what} nests too deeply to parse") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError("bad_request", f"{what} is not valid JSON: {err}") from None


def _load_object(frame: bytes) -> dict[str, Any]:
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError("too_large", f"message of {len(frame)} bytes; the limit is {MAX_FRAME_BYTES}")
    obj = parse_json(frame)
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "message must be a JSON object")
    return obj


def request_id_of(frame: bytes) -> str:
    """Best-effort id of a possibly malformed request, so that even an error reply can be matched. Never
    raises: it runs before any error handling can answer."""
    if len(frame) > MAX_FRAME_BYTES:
        return ""
    try:
        obj = parse_json(frame)
    except ProtocolError:
        return ""
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 64 else ""


def decode_request(frame: bytes) -> tuple[str, Request]:
    """Decode and validate one request frame. Returns (id, request); raises ProtocolError."""
    obj = _load_object(frame)
    version = obj.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})",
        )
    kind = obj.pop("type", None)
    request_id = obj.pop("id", "")
    if not isinstance(request_id, str) or len(request_id) > 64:
        raise ProtocolError("bad_request", "id must be a string of at most 64 characters")
    cls = REQUEST_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(
            "unknown_type", f"unknown message type {kind!r}; known: {', '.join(REQUEST_TYPES)}"
        )
    return request_id, cls.from_body(obj)


def encode_reply(request_id: str, fields: Mapping[str, Any]) -> bytes:
    envelope = {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **fields}
    return json.dumps(envelope, separators=(",", ":"), allow_nan=False).encode()


def encode_error(request_id: str, error: ProtocolError) -> bytes:
    envelope = {
        "v": PROTOCOL_VERSION,
        "id": request_id,
        "ok": False,
        "error": {"code": error.code, "message": error.message, "status": error.status},
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def decode_reply(frame: bytes) -> dict[str, Any]:
    """Decode a reply. Returns its fields when ok; raises ProtocolError carrying the remote error otherwise."""
    obj = _load_object(frame)
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"reply has protocol version {obj.get('v')!r}")
    if obj.get("ok") is True:
        return {k: v for k, v in obj.items() if k not in {"v", "ok"}}
    error = obj.get("error")
    code = error.get("code") if isinstance(error, Mapping) else None
    if not isinstance(code, str) or code not in ERROR_STATUS:
        raise ProtocolError("internal", "worker sent a malformed error reply")
    assert isinstance(error, Mapping)
    raise ProtocolError(code, str(error.get("message", "")))
