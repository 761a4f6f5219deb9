"""Weight versions, rollback targets and the gate's verdict (hogwild.versions), and the messages that carry
them (hogwild.protocol's rollback and configure): pure tables, no processes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from hogwild import versions
from hogwild.config import ConfigError, EvalGate, validate_changes
from hogwild.protocol import ConfigureRequest, ProtocolError, RollbackRequest, decode_request, encode_request
from hogwild.versions import Kept, Target, TargetError
from hogwild.vllm_plugin.versions import WeightsVersionMiddleware, read_version

VERSIONS = {
    "plain": ("3fa2c901.12", versions.Version("3fa2c901", 12)),
    "step zero": ("00000000.0", versions.Version("00000000", 0)),
    "upper-case hex": ("3FA2C901.12", None),
    "short lineage": ("3fa2c9.12", None),
    "leading zero step": ("3fa2c901.012", None),
    "no step": ("3fa2c901", None),
    "negative step": ("3fa2c901.-1", None),
}


@pytest.mark.parametrize(("text", "parsed"), VERSIONS.values(), ids=VERSIONS.keys())
def test_a_version_parses_only_in_its_one_spelling(text: str, parsed: versions.Version | None) -> None:
    assert versions.parse_version(text) == parsed
    if parsed is not None:
        assert str(parsed) == text


def test_new_lineages_do_not_repeat() -> None:
    lineages = {versions.new_lineage() for _ in range(1000)}
    assert len(lineages) == 1000 and all(versions.parse_version(f"{x}.1") for x in lineages)


TARGETS = {
    "previous": ("previous", Target(previous=True)),
    "a version": ("3fa2c901.12", Target(version="3fa2c901.12")),
    "a checkpoint step": (12, Target(step=12)),
    "step zero": (0, Target(step=0)),
}


@pytest.mark.parametrize(("value", "target"), TARGETS.values(), ids=TARGETS.keys())
def test_rollback_targets(value: Any, target: Target) -> None:
    assert versions.parse_target(value) == target
    assert RollbackRequest.from_body({"to": value}).to == target


BAD_TARGETS = {
    "negative step": -1,
    "a boolean": True,
    "a float": 1.5,
    "not a version": "latest",
    "null": None,
    "a list": [1],
}


@pytest.mark.parametrize("value", BAD_TARGETS.values(), ids=BAD_TARGETS.keys())
def test_a_bad_rollback_target_is_invalid_and_says_what_is_allowed(value: Any) -> None:
    with pytest.raises(ProtocolError) as err:
        RollbackRequest.from_body({"to": value})
    assert err.value.status == 422 and "previous" in err.value.message


@pytest.mark.parametrize("body", [{}, {"to": "previous", "extra": 1}], ids=["no target", "unknown field"])
def test_a_rollback_body_needs_exactly_a_target(body: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as err:
        RollbackRequest.from_body(body)
    assert err.value.status == 422


@pytest.mark.parametrize("value", ["previous", "3fa2c901.12", 7], ids=["previous", "version", "step"])
@pytest.mark.parametrize("request_id", [None, "2026-12-03-a"], ids=["no id", "an id"])
def test_a_rollback_message_round_trips(value: Any, request_id: str | None) -> None:
    _, decoded = decode_request(encode_request(RollbackRequest(versions.parse_target(value), request_id)))
    assert isinstance(decoded, RollbackRequest) and decoded.to == versions.parse_target(value)
    assert decoded.request_id == request_id


@pytest.mark.parametrize("request_id", ["", "x" * 65, 7], ids=["empty", "too long", "not a string"])
def test_a_bad_rollback_request_id_is_invalid(request_id: Any) -> None:
    with pytest.raises(ProtocolError) as err:
        RollbackRequest.from_body({"to": "previous", "request_id": request_id})
    assert err.value.status == 422


SNAP_A = Kept("snapshot", "1", "aaaaaaaa.3", 3)
SNAP_B = Kept("snapshot", "2", "aaaaaaaa.5", 5)
CKPT_0 = Kept("checkpoint", "/c/step-00000000", "99999999.0", 0)
CKPT_5 = Kept("checkpoint", "/c/step-00000005", "aaaaaaaa.5", 5)
PICKS = {
    "previous is the tracked snapshot": (Target(previous=True), SNAP_A, SNAP_A),
    "previous without a snapshot: the newest older checkpoint": (Target(previous=True), None, CKPT_5),
    "a version: snapshots first": (Target(version="aaaaaaaa.5"), None, SNAP_B),
    "a version only in a checkpoint": (Target(version="99999999.0"), None, CKPT_0),
    "a step: checkpoints only": (Target(step=5), SNAP_B, CKPT_5),
}


@pytest.mark.parametrize(("target", "previous", "expected"), PICKS.values(), ids=PICKS.keys())
def test_pick_target(target: Target, previous: Kept | None, expected: Kept) -> None:
    picked = versions.pick_target(
        target,
        current="bbbbbbbb.7",
        previous_snapshot=previous,
        snapshots=[SNAP_A, SNAP_B],
        checkpoints=[CKPT_0, CKPT_5],
    )
    assert picked == expected


@pytest.mark.parametrize(
    "target", [Target(version="cccccccc.1"), Target(step=4)], ids=["unknown version", "unknown step"]
)
def test_an_unknown_target_names_what_is_kept(target: Target) -> None:
    with pytest.raises(TargetError) as err:
        versions.pick_target(
            target, current="bbbbbbbb.7", previous_snapshot=None, snapshots=[SNAP_A], checkpoints=[CKPT_0]
        )
    assert "aaaaaaaa.3" in str(err.value) and "checkpoint steps: 0" in str(err.value)


VERDICTS = {
    "no rise allowed, it fell": (2.0, 1.9, 0.0, None, versions.ACCEPTED),
    "no rise allowed, it rose a little": (2.0, 2.0001, 0.0, None, versions.REVERTED),
    "absolute bound kept": (2.0, 2.4, 0.5, None, versions.ACCEPTED),
    "relative bound kept": (2.0, 2.19, None, 0.1, versions.ACCEPTED),
    "relative bound broken": (2.0, 2.21, None, 0.1, versions.REVERTED),
    "both: one broken is enough": (2.0, 2.3, 0.5, 0.1, versions.REVERTED),
    "NaN after": (2.0, math.nan, 10.0, None, versions.REVERTED),
    "inf after": (2.0, math.inf, None, 10.0, versions.REVERTED),
}


@pytest.mark.parametrize(
    ("before", "after", "rise", "ratio", "verdict"), VERDICTS.values(), ids=VERDICTS.keys()
)
def test_the_gate_verdict(
    before: float, after: float, rise: float | None, ratio: float | None, verdict: str
) -> None:
    judged = versions.judge(before, after, max_rise=rise, max_rise_ratio=ratio)
    assert judged.verdict == verdict and judged.reason
    assert judged.as_dict()["loss_before"] == before


GATES = {
    "absolute": ({"max_loss_rise": 0}, EvalGate(max_loss_rise=0.0)),
    "relative and a file": (
        {"max_loss_rise_ratio": 0.05, "eval_file": "/models/eval.jsonl"},
        EvalGate(max_loss_rise_ratio=0.05, eval_file="/models/eval.jsonl"),
    ),
    "off": ({}, EvalGate()),
}


@pytest.mark.parametrize(("value", "gate"), GATES.values(), ids=GATES.keys())
def test_gate_config(value: dict[str, Any], gate: EvalGate) -> None:
    assert validate_changes({"gate": value})["gate"] == gate
    assert gate.enabled == bool({"max_loss_rise", "max_loss_rise_ratio"} & set(value))


BAD_GATES = {
    "negative rise": {"max_loss_rise": -0.1},
    "NaN ratio": {"max_loss_rise_ratio": math.nan},
    "relative path": {"eval_file": "eval.jsonl"},
    "unknown field": {"max_loss": 1},
}


@pytest.mark.parametrize("value", BAD_GATES.values(), ids=BAD_GATES.keys())
def test_a_bad_gate_is_refused(value: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        validate_changes({"gate": value})


def test_configure_carries_the_gate_and_the_evaluation_set() -> None:
    body = {"changes": {"gate": {"max_loss_rise": 0}, "snapshots": 3}, "eval_samples": [{"text": "a fact"}]}
    request = ConfigureRequest.from_body(body)
    _, decoded = decode_request(encode_request(request))
    assert isinstance(decoded, ConfigureRequest)
    assert decoded.changes["gate"] == EvalGate(max_loss_rise=0.0) and decoded.changes["snapshots"] == 3
    assert decoded.eval_samples is not None and decoded.eval_samples[0].text == "a fact"


@pytest.mark.parametrize(
    "samples", [[], {"text": "x"}, [{"text": ""}]], ids=["empty", "not a list", "empty text"]
)
def test_an_empty_or_malformed_evaluation_set_is_invalid(samples: Any) -> None:
    with pytest.raises(ProtocolError) as err:
        ConfigureRequest.from_body({"eval_samples": samples})
    assert err.value.status == 422 and "eval_samples" in err.value.message


# ---- the version in OpenAI responses (hogwild.vllm_plugin.versions) ------------------------------------------
class VersionedApp:
    """An ASGI app that answers while the worker moves the version: arrival v.1, start v.2, last chunk v.3."""

    def __init__(self, path: Path, content_type: bytes) -> None:
        self.path, self.content_type = path, content_type

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.path.write_text("aaaaaaaa.2")
        headers = [(b"content-type", self.content_type)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        self.path.write_text("aaaaaaaa.3")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


RESPONSES = {
    "whole": ("/v1/completions", b"application/json", ("aaaaaaaa.2", "aaaaaaaa.1"), None),
    "streamed": ("/v1/completions", b"text/event-stream", ("aaaaaaaa.2", "aaaaaaaa.1"), "aaaaaaaa.3"),
    "not a serving route": ("/train/status", b"application/json", (None, None), None),
}


@pytest.mark.parametrize(
    ("route", "content_type", "headers", "last"), RESPONSES.values(), ids=RESPONSES.keys()
)
async def test_a_response_names_the_versions_that_produced_it(
    tmp_path: Path, route: str, content_type: bytes, headers: tuple[str | None, str | None], last: str | None
) -> None:
    path = tmp_path / versions.VERSION_FILE
    path.write_text("aaaaaaaa.1")
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    app = VersionedApp(path, content_type)
    await WeightsVersionMiddleware(app, path)({"type": "http", "path": route}, None, send)
    got = dict(sent[0]["headers"])
    assert (got.get(versions.HEADER.encode()), got.get(versions.FIRST_HEADER.encode())) == tuple(
        h.encode() if h else None for h in headers
    )
    body = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    closing = f"{versions.STREAM_COMMENT_PREFIX}{last}\n\n"
    assert body.endswith(closing) if last else versions.STREAM_COMMENT_PREFIX not in body


def test_a_missing_version_file_reads_as_unknown(tmp_path: Path) -> None:
    assert read_version(tmp_path / "absent") == "unknown"
