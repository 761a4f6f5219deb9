"""The training samples of a `/train` body (and of an evaluation set): their schema, decoded and validated.

A sample is one of `{"text"}`, `{"prompt", "completion"}`, `{"messages": [...]}` or `{"input_ids", "labels"}`.
Pure: no I/O; a malformed sample raises ProtocolError("invalid", ...) naming where it is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hogwild import defaults
from hogwild.errors import ProtocolError

SAMPLE_KINDS = ("text", "prompt_completion", "messages", "tokens")
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Sample:
    """One training example. Loss falls on `text`, on `completion`, on assistant turns, or where labels != -100."""

    kind: str
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    input_ids: tuple[int, ...] = ()
    labels: tuple[int, ...] = ()


def _text(where: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ProtocolError("invalid", f"{where} must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ProtocolError("invalid", f"{where} must not be empty")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ProtocolError("invalid", f"{where} is not valid Unicode (a lone surrogate)") from None
    return value


def _int_list(where: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ProtocolError("invalid", f"{where} must be a non-empty list of integers")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ProtocolError("invalid", f"{where} must contain only integers")
    return tuple(value)


def _decode_messages(where: str, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ProtocolError("invalid", f"{where} must be a non-empty list of {{role, content}} objects")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, Mapping) or set(turn) - {"role", "content"}:
            raise ProtocolError("invalid", f"{where}[{i}] must be an object with only 'role' and 'content'")
        role = turn.get("role")
        if role not in CHAT_ROLES:
            raise ProtocolError("invalid", f"{where}[{i}].role must be one of {', '.join(CHAT_ROLES)}")
        turns.append((str(role), _text(f"{where}[{i}].content", turn.get("content"), allow_empty=True)))
    if not any(role == "assistant" for role, _ in turns):
        raise ProtocolError("invalid", f"{where} has no assistant turn, so there is nothing to learn")
    return tuple(turns)


def decode_sample(where: str, value: Any) -> Sample:
    if not isinstance(value, Mapping):
        raise ProtocolError("invalid", f"{where} must be an object")
    keys = set(value)
    if keys == {"text"}:
        return Sample("text", text=_text(f"{where}.text", value["text"]))
    if keys == {"prompt", "completion"}:
        return Sample(
            "prompt_completion",
            prompt=_text(f"{where}.prompt", value["prompt"], allow_empty=True),
            completion=_text(f"{where}.completion", value["completion"]),
        )
    if keys == {"messages"}:
        return Sample("messages", messages=_decode_messages(f"{where}.messages", value["messages"]))
    if keys in ({"input_ids"}, {"input_ids", "labels"}):
        ids = _int_list(f"{where}.input_ids", value["input_ids"])
        labels = _int_list(f"{where}.labels", value["labels"]) if "labels" in value else ids
        if len(labels) != len(ids):
            raise ProtocolError("invalid", f"{where}.labels must have as many entries as input_ids")
        return Sample("tokens", input_ids=ids, labels=labels)
    raise ProtocolError(
        "invalid",
        f"{where} must have exactly one of these shapes: {{text}}, {{prompt, completion}}, {{messages}}, "
        f"{{input_ids[, labels]}}; got keys {sorted(keys)}",
    )


def encode_sample(sample: Sample) -> dict[str, Any]:
    if sample.kind == "text":
        return {"text": sample.text}
    if sample.kind == "prompt_completion":
        return {"prompt": sample.prompt, "completion": sample.completion}
    if sample.kind == "messages":
        return {"messages": [{"role": r, "content": c} for r, c in sample.messages]}
    return {"input_ids": list(sample.input_ids), "labels": list(sample.labels)}


def decode_samples(
    where: str, value: Any, *, limit: int = defaults.MAX_SAMPLES_PER_REQUEST
) -> tuple[Sample, ...]:
    if not isinstance(value, list) or not value:
        raise ProtocolError("invalid", f"{where} must be a non-empty list")
    if len(value) > limit:
        raise ProtocolError("too_large", f"at most {limit} samples in {where}, got {len(value)}")
    return tuple(decode_sample(f"{where}[{i}]", s) for i, s in enumerate(value))


def samples_digest(samples: tuple[Sample, ...]) -> str:
    """A short hash of samples as they are sent: equal sets, equal digests (the operator compares the
    evaluation set it would relay with the one the worker holds)."""
    canonical = json.dumps([encode_sample(s) for s in samples], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
