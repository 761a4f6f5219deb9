"""The message contract: every malformed request gets a typed error, never an exception of another kind."""

from __future__ import annotations

import json

import pytest

from hogwild import protocol
from hogwild.protocol import ProtocolError


def frame(obj: object) -> bytes:
    return json.dumps(obj).encode()


GOOD_SAMPLES = [
    ({"text": "hello"}, "text"),
    ({"prompt": "Q:", "completion": " A"}, "prompt_completion"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
    ({"input_ids": [1, 2, 3]}, "tokens"),
    ({"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, "tokens"),
]


@pytest.mark.parametrize(
    ("sample", "kind"), GOOD_SAMPLES, ids=[k for _, k in GOOD_SAMPLES[:4]] + ["tokens+labels"]
)
def test_sample_shapes_round_trip(sample: dict, kind: str) -> None:
    decoded = protocol.decode_sample("s", sample)
    assert decoded.kind == kind
    assert protocol.decode_sample("s", protocol.encode_sample(decoded)) == decoded


BAD_TRAIN_BODIES = {
    "no samples": ({}, "invalid", "samples"),
    "empty samples": ({"samples": []}, "invalid", "non-empty"),
    "samples not list": ({"samples": "hi"}, "invalid", "samples"),
    "unknown field": ({"samples": [{"text": "a"}], "lr": 1}, "invalid", "unknown field"),
    "mixed shape": ({"samples": [{"text": "a", "prompt": "b"}]}, "invalid", "exactly one"),
    "empty text": ({"samples": [{"text": ""}]}, "invalid", "must not be empty"),
    "text not str": ({"samples": [{"text": 3}]}, "invalid", "string"),
    "no assistant": ({"samples": [{"messages": [{"role": "user", "content": "x"}]}]}, "invalid", "assistant"),
    "bad role": ({"samples": [{"messages": [{"role": "robot", "content": "x"}]}]}, "invalid", "role"),
    "labels length": ({"samples": [{"input_ids": [1, 2], "labels": [1]}]}, "invalid", "as many"),
    "ids not ints": ({"samples": [{"input_ids": [1, "2"]}]}, "invalid", "integers"),
    "bool id": ({"samples": [{"input_ids": [True]}]}, "invalid", "integers"),
    "zero steps": ({"samples": [{"text": "a"}], "steps": 0}, "invalid", "steps"),
    "float steps": ({"samples": [{"text": "a"}], "steps": 1.5}, "invalid", "steps"),
    "huge steps": ({"samples": [{"text": "a"}], "steps": 10**9}, "invalid", "steps"),
    "negative timeout": ({"samples": [{"text": "a"}], "timeout_s": -1}, "invalid", "timeout_s"),
    "nan timeout": ({"samples": [{"text": "a"}], "timeout_s": float("nan")}, "invalid", "timeout_s"),
    "too many samples": ({"samples": [{"text": "a"}] * 1025}, "too_large", "at most"),
}


@pytest.mark.parametrize(("body", "code", "needle"), BAD_TRAIN_BODIES.values(), ids=BAD_TRAIN_BODIES.keys())
def test_bad_train_bodies_are_rejected_with_a_reason(body: dict, code: str, needle: str) -> None:
    with pytest.raises(ProtocolError) as err:
        protocol.TrainRequest.from_body(body)
    assert err.value.code == code
    assert needle in err.value.message


BAD_FRAMES = {
    "not json": (b"{nope", "bad_request"),
    "not utf8": (b"\xff\xfe", "bad_request"),
    "array": (b"[1,2]", "bad_request"),
    "no version": (frame({"type": "status"}), "unsupported_version"),
    "future version": (frame({"v": 99, "type": "status"}), "unsupported_version"),
    "unknown type": (frame({"v": 1, "type": "explode"}), "unknown_type"),
    "type not str": (frame({"v": 1, "type": 3}), "unknown_type"),
    "long id": (frame({"v": 1, "type": "status", "id": "x" * 65}), "bad_request"),
    "status with fields": (frame({"v": 1, "type": "status", "x": 1}), "invalid"),
    "configure unknown field": (frame({"v": 1, "type": "configure", "changes": {"nope": 1}}), "invalid"),
    "configure bad lr": (frame({"v": 1, "type": "configure", "changes": {"lr": -1}}), "invalid"),
    "restore nothing": (frame({"v": 1, "type": "restore", "weights": False, "optimizer": False}), "invalid"),
    "restore bad step": (frame({"v": 1, "type": "restore", "step": "last"}), "invalid"),
    "join no address": (frame({"v": 1, "type": "join", "replica": 0}), "invalid"),
    "join no port": (frame({"v": 1, "type": "join", "replica": 0, "rendezvous": "chat-replicas"}), "invalid"),
    "join port 0": (frame({"v": 1, "type": "join", "replica": 0, "rendezvous": "h:0"}), "invalid"),
    "join bad ordinal": (frame({"v": 1, "type": "join", "replica": -1, "rendezvous": "h:29500"}), "invalid"),
    "join ordinal bool": (
        frame({"v": 1, "type": "join", "replica": True, "rendezvous": "h:29500"}),
        "invalid",
    ),
    "join host_store": (
        frame({"v": 1, "type": "join", "replica": 0, "rendezvous": "h:1", "host_store": 1}),
        "invalid",
    ),
}


@pytest.mark.parametrize(("raw", "code"), BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_malformed_frames_decode_to_typed_errors(raw: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as err:
        protocol.decode_request(raw)
    assert err.value.code == code
    assert err.value.message


REQUESTS = [
    protocol.TrainRequest(samples=(protocol.Sample("text", text="a"),), steps=3, timeout_s=10.0),
    protocol.CheckpointRequest(reason="pre-restart"),
    protocol.StatusRequest(),
    protocol.ConfigureRequest(changes={"lr": 0.001, "betas": (0.8, 0.9), "paused": True}),
    protocol.RestoreRequest(step=12, optimizer=False),
    protocol.JoinRequest(replica=0, rendezvous="replica-0.chat-replicas.ml.svc:29500", host_store=True),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=[r.type for r in REQUESTS])
def test_requests_round_trip(request_: protocol.Request) -> None:
    request_id, decoded = protocol.decode_request(protocol.encode_request(request_, "abc"))
    assert request_id == "abc"
    assert decoded == request_


def test_error_reply_maps_to_http_status() -> None:
    raw = protocol.encode_error("r1", ProtocolError("busy", "one at a time"))
    with pytest.raises(ProtocolError) as err:
        protocol.decode_reply(raw)
    assert (err.value.code, err.value.status, err.value.message) == ("busy", 409, "one at a time")
    assert protocol.request_id_of(raw) == "r1"


def test_ok_reply_returns_fields() -> None:
    assert protocol.decode_reply(protocol.encode_reply("r2", {"step": 4}))["step"] == 4


def test_reply_refuses_nan() -> None:
    """JSON has no NaN: a worker must send null, and encoding refuses to produce invalid JSON."""
    with pytest.raises(ValueError):
        protocol.encode_reply("r", {"loss": float("nan")})
