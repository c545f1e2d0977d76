"""Every message of the wire protocol, their encoding, and the handshake's signed bytes.

A frame is one JSON object per websocket text frame (RFC 6455 section 5.6)::

    {"v": 1, "type": "telemetry", "seq": 42, "body": {...}}

``seq`` is present exactly on the reliable types (:data:`RELIABLE_TYPES`). Each frame type
is a struct tagged by ``type`` whose ``body`` is the matching ``*Body`` struct; :func:`wrap`
builds a frame around a body. Unknown fields are refused at every level.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias, overload

import msgspec

from agent.protocol.bodies import (
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
    NodeStatusBody,
    ProfileBody,
    Seq,
    ServiceRenewBody,
    TelemetryBody,
    WelcomeBody,
    WireStruct,
)
from agent.protocol.errors import DecodeError, LimitExceeded, ProtocolError
from agent.protocol.limits import (
    MAX_ERROR_DETAIL_CHARS,
    MAX_FRAME_BYTES,
    MAX_LOG_CHUNK_BYTES,
    MAX_SEQ,
    MAX_TELEMETRY_BATCH,
    PROTOCOL_VERSION,
)

__all__ = [
    "AGENT_SENDS",
    "COORDINATOR_SENDS",
    "RELIABLE_TYPES",
    "Ack",
    "AckBody",
    "AttestRequest",
    "AttestRequestBody",
    "Auth",
    "AuthBody",
    "Body",
    "Challenge",
    "ChallengeBody",
    "EnvelopeBody",
    "EnvelopeSignature",
    "Error",
    "ErrorBody",
    "Hello",
    "HelloBody",
    "ImagePrefetch",
    "ImagePrefetchBody",
    "JobCancel",
    "JobCancelBody",
    "JobLog",
    "JobLogBody",
    "JobOffer",
    "JobOfferBody",
    "JobResult",
    "JobResultBody",
    "JobStatus",
    "JobStatusBody",
    "Message",
    "NodeStatus",
    "NodeStatusBody",
    "Profile",
    "ProfileBody",
    "ReliableBody",
    "ReliableMessage",
    "ServiceRenew",
    "ServiceRenewBody",
    "Telemetry",
    "TelemetryBody",
    "Welcome",
    "WelcomeBody",
    "auth_signed_bytes",
    "challenge_signed_bytes",
    "decode_frame",
    "encode_frame",
    "encode_reliable",
    "error_message",
    "message_type",
    "reliable_overhead",
    "require_text",
    "wrap",
]


class _Frame(WireStruct, tag_field="type"):
    """A frame: version, type (the tag), and a body."""

    v: Literal[1]


class _Reliable(_Frame):
    """A frame of a reliable stream: numbered, kept by the sender until acknowledged."""

    seq: Seq


class Hello(_Frame, tag="hello"):
    """Frame of a ``hello``."""

    body: HelloBody


class Challenge(_Frame, tag="challenge"):
    """Frame of a ``challenge``."""

    body: ChallengeBody


class Auth(_Frame, tag="auth"):
    """Frame of an ``auth``."""

    body: AuthBody


class Welcome(_Frame, tag="welcome"):
    """Frame of a ``welcome``."""

    body: WelcomeBody


class Profile(_Reliable, tag="profile"):
    """Frame of a ``profile``."""

    body: ProfileBody


class Telemetry(_Reliable, tag="telemetry"):
    """Frame of a ``telemetry`` batch."""

    body: TelemetryBody


class NodeStatus(_Reliable, tag="node_status"):
    """Frame of a ``node_status``."""

    body: NodeStatusBody


class JobStatus(_Reliable, tag="job_status"):
    """Frame of a ``job_status``."""

    body: JobStatusBody


class JobLog(_Reliable, tag="job_log"):
    """Frame of a ``job_log`` chunk."""

    body: JobLogBody


class JobResult(_Reliable, tag="job_result"):
    """Frame of a ``job_result``."""

    body: JobResultBody


class JobOffer(_Reliable, tag="job_offer"):
    """Frame of a ``job_offer``."""

    body: JobOfferBody


class JobCancel(_Reliable, tag="job_cancel"):
    """Frame of a ``job_cancel``."""

    body: JobCancelBody


class ImagePrefetch(_Reliable, tag="image_prefetch"):
    """Frame of an ``image_prefetch``."""

    body: ImagePrefetchBody


class ServiceRenew(_Reliable, tag="service_renew"):
    """Frame of a ``service_renew``."""

    body: ServiceRenewBody


class AttestRequest(_Reliable, tag="attest_request"):
    """Frame of an ``attest_request``."""

    body: AttestRequestBody


class Ack(_Frame, tag="ack"):
    """Frame of an ``ack``."""

    body: AckBody


class Error(_Frame, tag="error"):
    """Frame of an ``error``."""

    body: ErrorBody


ReliableMessage: TypeAlias = (
    Profile
    | Telemetry
    | NodeStatus
    | JobStatus
    | JobLog
    | JobResult
    | JobOffer
    | JobCancel
    | ImagePrefetch
    | ServiceRenew
    | AttestRequest
)
Message: TypeAlias = Hello | Challenge | Auth | Welcome | Ack | Error | ReliableMessage
ReliableBody: TypeAlias = (
    ProfileBody
    | TelemetryBody
    | NodeStatusBody
    | JobStatusBody
    | JobLogBody
    | JobResultBody
    | JobOfferBody
    | JobCancelBody
    | ImagePrefetchBody
    | ServiceRenewBody
    | AttestRequestBody
)
Body: TypeAlias = HelloBody | ChallengeBody | AuthBody | WelcomeBody | AckBody | ErrorBody

_FRAME_OF_BODY: dict[type[WireStruct], type[_Frame]] = {
    HelloBody: Hello,
    ChallengeBody: Challenge,
    AuthBody: Auth,
    WelcomeBody: Welcome,
    ProfileBody: Profile,
    TelemetryBody: Telemetry,
    NodeStatusBody: NodeStatus,
    JobStatusBody: JobStatus,
    JobLogBody: JobLog,
    JobResultBody: JobResult,
    JobOfferBody: JobOffer,
    JobCancelBody: JobCancel,
    ImagePrefetchBody: ImagePrefetch,
    ServiceRenewBody: ServiceRenew,
    AttestRequestBody: AttestRequest,
    AckBody: Ack,
    ErrorBody: Error,
}
_TYPES: dict[str, type[_Frame]] = {str(f.__struct_config__.tag): f for f in _FRAME_OF_BODY.values()}

#: Types whose frames carry ``seq`` and are acknowledged.
RELIABLE_TYPES = frozenset(n for n, f in _TYPES.items() if issubclass(f, _Reliable))
#: Types an agent sends; a coordinator refuses the others as ``unknown_type``.
AGENT_SENDS = frozenset(
    {"hello", "auth", "profile", "telemetry", "node_status", "job_status", "job_log"}
    | {"job_result"}
    | {"ack", "error"}
)
#: Types a coordinator sends; an agent refuses the others as ``unknown_type``.
COORDINATOR_SENDS = frozenset(
    {"challenge", "welcome", "job_offer", "job_cancel", "image_prefetch", "service_renew"}
    | {"attest_request"}
    | {"ack", "error"}
)


class _StoredFrame(msgspec.Struct):
    """A reliable frame around a body encoded earlier (an outbox keeps bodies encoded).

    Its fields are in the order msgspec writes a tagged frame's (the tag first), so both
    encoders write the same text for the same message.
    """

    type: str
    v: int
    seq: int
    body: msgspec.Raw


_decoder: msgspec.json.Decoder[Message] = msgspec.json.Decoder(Message)
_encoder = msgspec.json.Encoder()


@overload
def wrap(body: ReliableBody, seq: int) -> ReliableMessage: ...
@overload
def wrap(body: Body) -> Message: ...
def wrap(body: Body | ReliableBody, seq: int | None = None) -> Message:
    """The frame around ``body``; ``seq`` is required for reliable bodies, refused otherwise."""
    frame: Any = _FRAME_OF_BODY[type(body)]
    if issubclass(frame, _Reliable) != (seq is not None):
        raise TypeError(f"{type(body).__name__}: seq is required exactly on reliable types")
    if seq is None:
        return frame(v=PROTOCOL_VERSION, body=body)  # type: ignore[no-any-return]
    return frame(v=PROTOCOL_VERSION, seq=seq, body=body)  # type: ignore[no-any-return]


def message_type(message: Message) -> str:
    """The wire ``type`` of a message."""
    return str(message.__struct_config__.tag)


def error_message(error: ProtocolError, ref_seq: int | None = None) -> Error:
    """The ``error`` frame that tells the peer about ``error``."""
    detail = error.detail[:MAX_ERROR_DETAIL_CHARS]
    return Error(
        v=PROTOCOL_VERSION, body=ErrorBody(code=error.code, detail=detail, ref_seq=ref_seq)
    )


def decode_frame(data: str | bytes, *, accept: frozenset[str] | None = None) -> Message:
    """Decode one frame, refusing anything but a valid message within the limits.

    Args:
        data: the text (or its UTF-8 bytes) of one websocket frame.
        accept: the types this side takes (:data:`AGENT_SENDS` on a coordinator); others
            are ``unknown_type``. ``None`` takes every type.

    Raises:
        DecodeError: ``frame_too_large``, ``bad_json``, ``bad_version``, ``unknown_type``,
            or ``bad_message`` with the path of the offending field.
        LimitExceeded: ``batch_too_large`` or ``log_chunk_too_large``.
    """
    size = _utf8_size(data)
    if size > MAX_FRAME_BYTES:
        raise DecodeError("frame_too_large", f"{size} bytes, limit {MAX_FRAME_BYTES}")
    try:
        message = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _diagnose(data, exc) from None
    except msgspec.DecodeError as exc:
        raise DecodeError("bad_json", str(exc)) from None
    except RecursionError:  # msgspec's own limit: a frame of nested brackets
        raise DecodeError("bad_json", "nested too deeply") from None
    if accept is not None and message_type(message) not in accept:
        raise DecodeError("unknown_type", f"{message_type(message)!r} is not accepted here")
    _check_limits(message)
    return message


def encode_frame(message: Message) -> str:
    """Encode one frame as the text of a websocket frame.

    Raises:
        LimitExceeded: the peer would refuse it: ``batch_too_large``,
            ``log_chunk_too_large`` or ``frame_too_large``.
    """
    _check_limits(message)
    data = _encoder.encode(message)
    if len(data) > MAX_FRAME_BYTES:
        raise LimitExceeded("frame_too_large", f"{len(data)} bytes, limit {MAX_FRAME_BYTES}")
    return data.decode()


def encode_reliable(kind: str, seq: int, body: bytes) -> str:
    """Encode the frame of reliable message ``seq`` around ``body``, already encoded JSON.

    Raises:
        LimitExceeded: ``frame_too_large``: the peer would refuse it.
    """
    if kind not in RELIABLE_TYPES:
        raise ValueError(f"{kind!r} is not a reliable type")
    frame = _StoredFrame(type=kind, v=PROTOCOL_VERSION, seq=seq, body=msgspec.Raw(body))
    data = _encoder.encode(frame)
    if len(data) > MAX_FRAME_BYTES:
        raise LimitExceeded("frame_too_large", f"{len(data)} bytes, limit {MAX_FRAME_BYTES}")
    return data.decode()


def reliable_overhead(kind: str, seq: int = MAX_SEQ) -> int:
    """Bytes that :func:`encode_reliable` adds around a body (at most: the longest seq).

    A body of ``MAX_FRAME_BYTES - reliable_overhead(kind)`` bytes or less fits one frame
    whatever seq it is given.
    """
    if kind not in RELIABLE_TYPES:
        raise ValueError(f"{kind!r} is not a reliable type")
    frame = _StoredFrame(type=kind, v=PROTOCOL_VERSION, seq=seq, body=msgspec.Raw(b""))
    return len(_encoder.encode(frame))


def challenge_signed_bytes(agent_nonce: str, coordinator_nonce: str, node_id: str) -> bytes:
    """The bytes a coordinator signs in ``challenge``."""
    return _signed_bytes(b"challenge", agent_nonce, coordinator_nonce, node_id)


def auth_signed_bytes(
    agent_nonce: str, coordinator_nonce: str, node_id: str, coordinator_key_id: str
) -> bytes:
    """The bytes an agent signs in ``auth``."""
    return _signed_bytes(b"auth", agent_nonce, coordinator_nonce, node_id, coordinator_key_id)


# Ed25519 (RFC 8032) has no context input, so a domain prefix keeps a handshake signature
# from standing for anything else the same key signs: the prefix differs from DSSE's PAE
# ("DSSEv1 ...") and between the two handshake steps, so a challenge signature can never
# pass as an auth signature or as an attestation.
_DOMAIN = b"gpu-agent handshake v1\n"


def _signed_bytes(step: bytes, *fields: str) -> bytes:
    # Each field is prefixed by its 8-byte big-endian length, like DSSE's PAE, so that no
    # two different field lists encode to the same bytes.
    out = bytearray(_DOMAIN + step + b"\n")
    for field in fields:
        raw = field.encode()
        out += len(raw).to_bytes(8, "big") + raw
    return bytes(out)


def _utf8_size(data: str | bytes) -> int:
    if isinstance(data, bytes):
        return len(data)
    if len(data) * 4 <= MAX_FRAME_BYTES:  # a code point is at most 4 bytes: surely fits
        return len(data)
    return len(data.encode("utf-8", "surrogatepass"))


def _check_limits(message: Message) -> None:
    if isinstance(message, Telemetry) and len(message.body.samples) > MAX_TELEMETRY_BATCH:
        raise LimitExceeded(
            "batch_too_large",
            f"{len(message.body.samples)} samples, limit {MAX_TELEMETRY_BATCH}",
        )
    # max_length on the field counts code points; the limit is in bytes.
    if isinstance(message, JobLog) and len(message.body.data.encode()) > MAX_LOG_CHUNK_BYTES:
        raise LimitExceeded("log_chunk_too_large", f"limit {MAX_LOG_CHUNK_BYTES} bytes")


def _diagnose(data: str | bytes, exc: msgspec.ValidationError) -> ProtocolError:
    """Name what is wrong with a frame that is JSON but not a valid message."""
    # msgspec stops at the first invalid value, so the rest may not even be JSON.
    try:
        frame = msgspec.json.decode(data)
    except msgspec.DecodeError as bad_json:
        return DecodeError("bad_json", str(bad_json))
    except RecursionError:  # the typed decode stopped before the nesting; this one does not
        return DecodeError("bad_json", "nested too deeply")
    if not isinstance(frame, dict):
        return DecodeError("bad_message", str(exc))
    version = frame.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        return DecodeError("bad_version", f"v={version!r}, this side speaks {PROTOCOL_VERSION}")
    kind = frame.get("type")
    if not isinstance(kind, str) or kind not in _TYPES:
        return DecodeError("unknown_type", f"type={kind!r}")
    body = frame.get("body")
    if isinstance(body, dict):
        samples = body.get("samples")
        if kind == "telemetry" and isinstance(samples, list) and len(samples) > MAX_TELEMETRY_BATCH:
            return LimitExceeded(
                "batch_too_large", f"{len(samples)} samples, limit {MAX_TELEMETRY_BATCH}"
            )
        chunk = body.get("data")
        if kind == "job_log" and isinstance(chunk, str) and len(chunk) > MAX_LOG_CHUNK_BYTES:
            return LimitExceeded("log_chunk_too_large", f"limit {MAX_LOG_CHUNK_BYTES} bytes")
    # msgspec's message ends with the JSON path of the field, e.g. "- at `$.body.seq`".
    return DecodeError("bad_message", str(exc))


def require_text(data: str | bytes) -> str:
    """The text of a websocket frame; DecodeError ``binary_frame`` for a binary one.

    Frames are text (RFC 6455 section 5.6, opcode 0x1); a binary frame (0x2) is refused
    even when its bytes would decode, so that both sides speak exactly one framing.
    """
    if not isinstance(data, str):
        raise DecodeError("binary_frame", f"a binary frame of {len(data)} bytes; frames are text")
    return data
