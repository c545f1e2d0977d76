"""The wire messages: round-trips, every decode error code, and the limits."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.bodies import UnitStatus
from agent.protocol.errors import DecodeError, LimitExceeded
from agent.protocol.limits import MAX_FRAME_BYTES, MAX_LOG_CHUNK_BYTES, MAX_TELEMETRY_BATCH
from agent.protocol.messages import (
    AGENT_SENDS,
    COORDINATOR_SENDS,
    RELIABLE_TYPES,
    AckBody,
    AttestRequestBody,
    AuthBody,
    ChallengeBody,
    EnvelopeBody,
    EnvelopeSignature,
    ErrorBody,
    HelloBody,
    ImagePrefetchBody,
    JobCancelBody,
    JobLogBody,
    JobOfferBody,
    JobResultBody,
    JobStatusBody,
    Message,
    NodeStatusBody,
    ProfileBody,
    ServiceRenewBody,
    TelemetryBody,
    WelcomeBody,
    auth_signed_bytes,
    challenge_signed_bytes,
    decode_frame,
    encode_frame,
    error_message,
    message_type,
    wrap,
)


def b64(n: int, fill: int = 7) -> str:
    return base64.b64encode(bytes([fill]) * n).decode()


ENVELOPE = EnvelopeBody(
    payload=base64.b64encode(b'{"_type":"https://in-toto.io/Statement/v1"}').decode(),
    payloadType="application/vnd.in-toto+json",
    signatures=[EnvelopeSignature(keyid="ed25519:00ff", sig=b64(64))],
)

EXAMPLES: dict[str, Message] = {
    "hello": wrap(
        HelloBody(
            node_id="node-abc",
            public_key=b64(32),
            agent_version="0.1.0",
            protocol_versions=[1],
            agent_nonce=b64(32, 1),
            last_coordinator_seq=0,
        )
    ),
    "challenge": wrap(
        ChallengeBody(coordinator_nonce=b64(32, 2), key_id="ed25519:00ff", signature=b64(64))
    ),
    "auth": wrap(AuthBody(signature=b64(64, 3))),
    "welcome": wrap(
        WelcomeBody(session_id="s-1", last_agent_seq=41, heartbeat_s=15, telemetry_interval_s=1)
    ),
    "profile": wrap(ProfileBody(attestation=ENVELOPE), 1),
    "telemetry": wrap(TelemetryBody(samples=[{"gpu": {"util_gpu_pct": 93.0}}], dropped=2), 2),
    "node_status": wrap(
        NodeStatusBody(
            available=False,
            reason="paused",
            units=[UnitStatus(id="GPU-1", health="unhealthy", reason="xid_79", job_id="job-1")],
        ),
        6,
    ),
    "job_status": wrap(JobStatusBody(job_id="job-1", state="running"), 3),
    "job_log": wrap(JobLogBody(job_id="job-1", stream="stdout", data="epoch 1\n"), 4),
    "job_result": wrap(JobResultBody(job_id="job-1", receipt=ENVELOPE), 5),
    "job_offer": wrap(JobOfferBody(job_id="job-1", offer=ENVELOPE), 1),
    "job_cancel": wrap(JobCancelBody(job_id="job-1", reason="preempted"), 2),
    "image_prefetch": wrap(ImagePrefetchBody(image="r.example/m@sha256:" + "5f" * 32), 3),
    "service_renew": wrap(ServiceRenewBody(job_id="job-1", lease_until=1764770400.5), 4),
    "attest_request": wrap(AttestRequestBody(nonce=b64(32, 9)), 3),
    "ack": wrap(AckBody(seq=5)),
    "error": wrap(ErrorBody(code="seq_gap", detail="seq 7, expected 6", ref_seq=7)),
}


def frame(**fields: Any) -> str:
    base: dict[str, Any] = {"v": 1, "type": "ack", "body": {"seq": 1}}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}, ensure_ascii=False)


def test_examples_cover_every_type() -> None:
    assert set(EXAMPLES) == AGENT_SENDS | COORDINATOR_SENDS
    assert {message_type(m) for m in EXAMPLES.values()} == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_message_round_trips(name: str) -> None:
    message = EXAMPLES[name]
    text = encode_frame(message)
    if name == "telemetry":
        # Its samples decode as msgspec.Raw (the bytes received): compared as encoded.
        assert encode_frame(decode_frame(text)) == text
        assert encode_frame(decode_frame(text.encode())) == text
    else:
        assert decode_frame(text) == message
        assert decode_frame(text.encode()) == message
    wire = json.loads(text)
    assert wire["v"] == 1
    assert wire["type"] == name
    assert ("seq" in wire) == (name in RELIABLE_TYPES)


def test_reliable_types_are_the_streams_of_the_architecture() -> None:
    streams = {"profile", "telemetry", "node_status", "job_status", "job_log", "job_result"}
    streams |= {"job_offer", "job_cancel", "image_prefetch", "service_renew", "attest_request"}
    assert streams == RELIABLE_TYPES


def test_wrap_wants_seq_exactly_on_reliable_bodies() -> None:
    with pytest.raises(TypeError):
        wrap(AckBody(seq=1), 3)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        wrap(JobCancelBody(job_id="j"))  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "data",
    [
        "{",
        "",
        "nul",
        b"\xff\xfe",
        '{"v": 1,}',
        # Invalid early and truncated later: msgspec stops at the first invalid value.
        "[1,",
        '{"v": 2, "type": "ack",',
        '{"v": 1, "type": "ack", "body": {"seq": "x"}, ',
    ],
)
def test_malformed_json_is_bad_json(data: str | bytes) -> None:
    with pytest.raises(DecodeError) as err:
        decode_frame(data)
    assert err.value.code == "bad_json"


@pytest.mark.parametrize("version", [2, 0, "1", 1.5, True, None, ...])
def test_other_or_missing_version_is_bad_version(version: object) -> None:
    with pytest.raises(DecodeError) as err:
        decode_frame(frame(v=version))
    assert err.value.code == "bad_version"


@pytest.mark.parametrize("kind", ["nope", "Hello", "", 3, None, ...])
def test_unknown_or_missing_type_is_unknown_type(kind: object) -> None:
    with pytest.raises(DecodeError) as err:
        decode_frame(frame(type=kind))
    assert err.value.code == "unknown_type"


def test_a_type_this_side_does_not_take_is_unknown_type() -> None:
    offer = encode_frame(EXAMPLES["job_offer"])
    with pytest.raises(DecodeError) as err:
        decode_frame(offer, accept=AGENT_SENDS)
    assert err.value.code == "unknown_type"
    assert decode_frame(offer, accept=COORDINATOR_SENDS) == EXAMPLES["job_offer"]


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ("[]", "Expected `object`"),
        (frame(body={"seq": -1}), "$.body.seq"),
        (frame(body={"seq": "1"}), "$.body.seq"),
        (frame(body={"seq": 1, "extra": 0}), "unknown field `extra` - at `$.body`"),
        (frame(body={}), "missing required field `seq` - at `$.body`"),
        (frame(body=...), "missing required field `body`"),
        (frame(seq=4), "unknown field `seq`"),
        (frame(colour="red"), "unknown field `colour`"),
        (frame(type="job_cancel", body={"job_id": "j"}), "missing required field `seq`"),
        (frame(type="job_cancel", seq=0, body={"job_id": "j"}), "$.seq"),
        (frame(type="auth", body={"signature": "not base64"}), "$.body.signature"),
        (frame(type="job_log", seq=1, body={"job_id": "j", "stream": "x", "data": ""}), "stream"),
        (frame(type="service_renew", seq=1, body={"job_id": "j", "lease_until": 0}), "until"),
        (frame(type="service_renew", seq=1, body={"job_id": "j", "lease_until": -5}), "until"),
        (frame(type="service_renew", seq=1, body={"job_id": "j", "lease_until": 1e12}), "until"),
        (frame(type="service_renew", seq=1, body={"job_id": "j", "lease_until": "1"}), "until"),
        (frame(type="service_renew", seq=1, body={"job_id": "", "lease_until": 1}), "job_id"),
        (frame(type="service_renew", seq=1, body={"lease_until": 1}), "job_id"),
    ],
)
def test_invalid_message_is_bad_message_naming_the_field(data: str, path: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode_frame(data)
    assert err.value.code == "bad_message"
    assert path in err.value.detail


@pytest.mark.parametrize("as_bytes", [False, True])
def test_frame_over_the_limit_is_refused_before_parsing(as_bytes: bool) -> None:
    data = "x" * (MAX_FRAME_BYTES + 1)  # not even JSON: the size is checked first
    with pytest.raises(DecodeError) as err:
        decode_frame(data.encode() if as_bytes else data)
    assert err.value.code == "frame_too_large"


def test_frame_size_counts_utf8_bytes_not_characters() -> None:
    chars = MAX_FRAME_BYTES // 2
    data = frame(type="error", body={"code": "x", "detail": "é" * chars})
    assert len(data) < MAX_FRAME_BYTES
    with pytest.raises(DecodeError) as err:
        decode_frame(data)
    assert err.value.code == "frame_too_large"


def test_telemetry_batch_over_the_limit_is_limit_exceeded() -> None:
    samples = [{"i": i} for i in range(MAX_TELEMETRY_BATCH + 1)]
    data = frame(type="telemetry", seq=1, body={"samples": samples})
    with pytest.raises(LimitExceeded) as err:
        decode_frame(data)
    assert err.value.code == "batch_too_large"
    with pytest.raises(LimitExceeded):
        encode_frame(wrap(TelemetryBody(samples=samples), 1))
    full = wrap(TelemetryBody(samples=samples[:-1]), 1)
    assert encode_frame(decode_frame(encode_frame(full))) == encode_frame(full)


@pytest.mark.parametrize(
    "text", ["a" * (MAX_LOG_CHUNK_BYTES + 1), "€" * (MAX_LOG_CHUNK_BYTES // 2)]
)
def test_log_chunk_over_the_byte_limit_is_limit_exceeded(text: str) -> None:
    body = {"job_id": "j", "stream": "stderr", "data": text}
    with pytest.raises(LimitExceeded) as err:
        decode_frame(frame(type="job_log", seq=1, body=body))
    assert err.value.code == "log_chunk_too_large"
    with pytest.raises(LimitExceeded):
        encode_frame(wrap(JobLogBody(job_id="j", stream="stderr", data=text), 1))


def test_log_chunk_at_the_limit_passes() -> None:
    message = wrap(JobLogBody(job_id="j", stream="stdout", data="a" * MAX_LOG_CHUNK_BYTES), 1)
    assert decode_frame(encode_frame(message)) == message


def test_encoding_a_frame_the_peer_would_refuse_is_limit_exceeded() -> None:
    samples = [{"blob": "x" * 4000} for _ in range(300)]
    with pytest.raises(LimitExceeded) as err:
        encode_frame(wrap(TelemetryBody(samples=samples), 1))
    assert err.value.code == "frame_too_large"


def test_error_message_carries_the_code_and_a_bounded_detail() -> None:
    message = error_message(LimitExceeded("rate_limited", "x" * 5000), ref_seq=3)
    assert message.body.code == "rate_limited"
    assert message.body.ref_seq == 3
    assert decode_frame(encode_frame(message)) == message


def test_signed_bytes_are_domain_separated_between_steps() -> None:
    challenge = challenge_signed_bytes("a", "c", "node")
    auth = auth_signed_bytes("a", "c", "node", "key")
    assert challenge.startswith(b"gpu-agent handshake v1\nchallenge\n")
    assert auth.startswith(b"gpu-agent handshake v1\nauth\n")
    assert not auth.startswith(challenge)


def test_signed_bytes_do_not_collide_when_fields_shift() -> None:
    assert challenge_signed_bytes("ab", "c", "n") != challenge_signed_bytes("a", "bc", "n")
    assert auth_signed_bytes("a", "b", "n", "k") != auth_signed_bytes("b", "a", "n", "k")


def test_signed_bytes_are_stable() -> None:
    # Both sides of the wire compute these independently: a change breaks every peer.
    assert challenge_signed_bytes("A", "B", "n") == (
        b"gpu-agent handshake v1\nchallenge\n"
        b"\x00\x00\x00\x00\x00\x00\x00\x01A"
        b"\x00\x00\x00\x00\x00\x00\x00\x01B"
        b"\x00\x00\x00\x00\x00\x00\x00\x01n"
    )


@pytest.mark.parametrize(
    ("kind", "field"),
    [("hello", "node_id"), ("job_status", "job_id"), ("job_cancel", "job_id"), ("error", "code")],
)
def test_a_trailing_newline_never_passes_a_pattern(kind: str, field: str) -> None:
    # Python's `$` also matches before a final newline; the wire's patterns must not.
    page = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    frames = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", page, re.DOTALL)]
    frame = next(f for f in frames if f["type"] == kind and field in f["body"])
    decode_frame(json.dumps(frame))
    frame["body"][field] += "\n"
    with pytest.raises(DecodeError):
        decode_frame(json.dumps(frame))


@pytest.mark.parametrize(
    "frame",
    [
        '{{"v": 1, "type": "ack", "body": {{"x": {nested}}}}}',  # an unknown field
        '{{"v": 1, "type": "telemetry", "seq": 1, "body": {{"samples": [{{"x": {nested}}}]}}}}',
    ],
)
def test_a_frame_nested_too_deeply_is_bad_json(frame: str) -> None:
    nested = "[" * 40_000 + "]" * 40_000
    with pytest.raises(DecodeError) as refused:
        decode_frame(frame.format(nested=nested))
    assert refused.value.code == "bad_json"


@pytest.mark.parametrize(
    "image",
    ["busybox:1", "sha256:" + "a" * 64, "r.example/m@sha256:" + "A" * 64, "r/m@sha256:1\n"],
)
def test_a_prefetch_names_an_image_by_digest_only(image: str) -> None:
    text = json.dumps({"v": 1, "type": "image_prefetch", "seq": 1, "body": {"image": image}})
    with pytest.raises(DecodeError) as caught:
        decode_frame(text)
    assert caught.value.code == "bad_message"
    assert "$.body.image" in caught.value.detail
