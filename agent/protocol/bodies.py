"""The bodies of the wire protocol's messages: what is inside ``"body"`` of each frame.

:mod:`agent.protocol.messages` re-exports them with the frames around them; import from there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

import msgspec
from msgspec import Meta

from agent.protocol.limits import (
    MAX_ERROR_DETAIL_CHARS,
    MAX_LEASE_UNTIL,
    MAX_LOG_CHUNK_BYTES,
    MAX_PROGRESS_INPUTS,
    MAX_PROGRESS_LAYERS,
    MAX_PROGRESS_PATH_CHARS,
    MAX_SEQ,
    MAX_TELEMETRY_BATCH,
)

__all__ = [
    "AckBody",
    "AttestRequestBody",
    "AuthBody",
    "ChallengeBody",
    "EnrolmentToken",
    "EnvelopeBody",
    "EnvelopeSignature",
    "ErrorBody",
    "HelloBody",
    "ImagePrefetchBody",
    "InputProgress",
    "JobCancelBody",
    "JobLogBody",
    "JobOfferBody",
    "JobResultBody",
    "JobStatusBody",
    "LayerProgress",
    "NodeStatusBody",
    "ProfileBody",
    "Seq",
    "SeqOrZero",
    "ServiceRenewBody",
    "TelemetryBody",
    "UnitStatus",
    "WelcomeBody",
    "WireStruct",
]

# Every pattern ends ``(?!\n)$``: msgspec checks with Python's re.search, whose ``$`` also
# matches before a final newline ("job-1\n" would pass); in JSON Schema's ECMA-262 dialect
# the two read the same.
# Standard base64 with padding (RFC 4648 section 4) of exactly 32 and 64 bytes: Ed25519
# public keys and nonces, Ed25519 signatures (RFC 8032 section 5.1.5, 5.1.6).
_B64_32 = r"^[A-Za-z0-9+/]{43}=(?!\n)$"
_B64_64 = r"^[A-Za-z0-9+/]{86}==(?!\n)$"

Seq = Annotated[int, Meta(ge=1, le=MAX_SEQ, description="Sequence number, from 1.")]
SeqOrZero = Annotated[int, Meta(ge=0, le=MAX_SEQ, description="Sequence number; 0: none.")]
Nonce = Annotated[str, Meta(pattern=_B64_32, description="32 random bytes, base64.")]
PublicKey = Annotated[str, Meta(pattern=_B64_32, description="Raw Ed25519 key, base64.")]
Signature = Annotated[str, Meta(pattern=_B64_64, description="Ed25519 signature, base64.")]
Name = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@/+=-]+(?!\n)$")]
Code = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*(?!\n)$")]
Text = Annotated[str, Meta(max_length=MAX_ERROR_DETAIL_CHARS)]
Seconds = Annotated[float, Meta(gt=0, le=86400)]
EnrolmentToken = Annotated[str, Meta(min_length=1, max_length=256)]
ProfileDigest = Annotated[
    str,
    Meta(
        pattern=r"^[0-9a-f]{64}(?!\n)$",
        description="Lowercase hex SHA-256 of the profile's canonical JSON (its attestation's"
        " subject digest).",
    ),
]
# A value in a telemetry sample: decoded as msgspec.Raw (the bytes received, checked as JSON,
# not built); an agent builds its samples from plain values, which encode the same: Any to
# the type checker.
if TYPE_CHECKING:
    SampleValue: TypeAlias = Any
else:
    SampleValue = msgspec.Raw


class WireStruct(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Settings shared by every wire struct."""


class EnvelopeSignature(WireStruct, kw_only=True):
    """One signature of a DSSE envelope."""

    keyid: str = ""
    sig: str


class EnvelopeBody(WireStruct):
    """A DSSE envelope (secure-systems-lab/dsse, envelope.md), as agent.protocol.dsse has it."""

    payload: str
    payloadType: str  # the DSSE spelling on the wire
    signatures: Annotated[list[EnvelopeSignature], Meta(min_length=1, max_length=8)]


class HelloBody(WireStruct, omit_defaults=True):
    """Agent, first: who it is, what it speaks, a fresh nonce, where its inbound stream is;
    and the digest of the hardware profile it would attest (omitted when None: an older
    agent), so that a coordinator holding a recent verified profile of that digest need
    not ask for a new attestation."""

    node_id: Name
    public_key: PublicKey
    agent_version: Annotated[str, Meta(min_length=1, max_length=64)]
    protocol_versions: Annotated[list[int], Meta(min_length=1, max_length=16)]
    agent_nonce: Nonce
    last_coordinator_seq: SeqOrZero
    profile_digest: ProfileDigest | None = None


class ChallengeBody(WireStruct):
    """Coordinator, second: its nonce and proof that it holds the key the agent pinned."""

    coordinator_nonce: Nonce
    key_id: Name
    signature: Signature


class AuthBody(WireStruct, omit_defaults=True):
    """Agent, third: proof that it holds the key named in ``hello``; and, to enrol with a
    coordinator that asks for one, its enrolment token (sent only now, once the coordinator
    has proved it holds the pinned key; omitted when None)."""

    signature: Signature
    enrolment_token: EnrolmentToken | None = None


class WelcomeBody(WireStruct):
    """Coordinator, last: the session is open; resend after ``last_agent_seq``."""

    session_id: Name
    last_agent_seq: SeqOrZero
    heartbeat_s: Seconds
    telemetry_interval_s: Seconds


class ProfileBody(WireStruct):
    """The hardware profile, attested by the node key."""

    attestation: EnvelopeBody


class TelemetryBody(WireStruct):
    """A batch of telemetry samples, oldest first; ``dropped`` counts the batches the
    agent's outbox shed in its place while offline (a tombstone: no samples, dropped=1)."""

    # Each sample is a JSON object whose values stay the bytes received (msgspec.Raw,
    # checked as JSON but not built): a coordinator stores a batch of 10 samples of 8 GPUs
    # without making the ~3,400 Python objects they hold (docs/coordinator.md, issue 14).
    samples: Annotated[list[dict[str, SampleValue]], Meta(max_length=MAX_TELEMETRY_BATCH)]
    dropped: Annotated[int, Meta(ge=0)] = 0


class UnitStatus(WireStruct):
    """One schedulable GPU (or MIG instance) of a node: its health and its job."""

    id: Name
    health: Literal["healthy", "unhealthy"]
    reason: Text = ""
    job_id: Name | None = None


class NodeStatusBody(WireStruct):
    """Whether the node takes jobs now and on which GPUs; sent whenever that changes.

    Never sent while the node is still checking its GPUs: a coordinator that has none
    from a node offers it nothing.
    """

    available: bool
    units: Annotated[list[UnitStatus], Meta(max_length=1024)]
    reason: Annotated[str, Meta(max_length=64, pattern=r"^([a-z][a-z0-9_]*)?(?!\n)$")] = ""
    detail: Text = ""


class LayerProgress(WireStruct):
    """One image layer's download: bytes done of its total (0: not known yet)."""

    layer: Name
    done: Annotated[int, Meta(ge=0, le=MAX_SEQ)]
    total: Annotated[int, Meta(ge=0, le=MAX_SEQ)]


class InputProgress(WireStruct):
    """One URL input's fetch: bytes done of its size; ``path`` is where it goes in /input."""

    path: Annotated[str, Meta(min_length=1, max_length=MAX_PROGRESS_PATH_CHARS)]
    done: Annotated[int, Meta(ge=0, le=MAX_SEQ)]
    total: Annotated[int, Meta(ge=0, le=MAX_SEQ)]


class JobStatusBody(WireStruct):
    """A job changed state; ``code`` says why when it failed or was refused. While the
    state is ``pulling``, ``progress`` has each image layer's download; while it is
    ``fetching``, ``inputs`` has each URL input's fetch (both rate-limited).

    ``progress`` and ``inputs`` are left out when unset, so that a coordinator that
    predates them (and refuses unknown fields) reads every other status as before."""

    job_id: Name
    state: Code
    code: Annotated[str, Meta(max_length=64)] = ""
    detail: Text = ""
    progress: (
        Annotated[list[LayerProgress], Meta(max_length=MAX_PROGRESS_LAYERS)] | msgspec.UnsetType
    ) = msgspec.UNSET
    inputs: (
        Annotated[list[InputProgress], Meta(max_length=MAX_PROGRESS_INPUTS)] | msgspec.UnsetType
    ) = msgspec.UNSET


class JobLogBody(WireStruct):
    """A bounded chunk of a job's output, in order within its stream."""

    job_id: Name
    stream: Literal["stdout", "stderr"]
    data: Annotated[str, Meta(max_length=MAX_LOG_CHUNK_BYTES)]


class JobResultBody(WireStruct):
    """A job finished: its receipt, attested by the node key."""

    job_id: Name
    receipt: EnvelopeBody


class JobOfferBody(WireStruct):
    """A job spec inside an envelope signed by the coordinator (agent.protocol.jobs);
    ``job_id`` repeats the signed one, so that a refusal can name even a forged offer."""

    job_id: Name
    offer: EnvelopeBody


class JobCancelBody(WireStruct):
    """Stop a job."""

    job_id: Name
    reason: Text = ""


class ServiceRenewBody(WireStruct):
    """Extend a running service's lease to ``lease_until`` (seconds since the epoch).

    A time, not a duration: a renewal delivered late (the stream waited for a reconnect)
    is then stale and changes nothing, instead of granting a full lease from its arrival.
    """

    job_id: Name
    lease_until: Annotated[float, Meta(gt=0, le=MAX_LEASE_UNTIL)]


class ImagePrefetchBody(WireStruct):
    """Pull this image now, before a job needs it: ``repository@sha256:<digest>``."""

    image: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=512,
            pattern=r"^[a-z0-9][a-z0-9._:/-]*@sha256:[0-9a-f]{64}(?!\n)$",
        ),
    ]


class AttestRequestBody(WireStruct):
    """Attest the profile again now, with this nonce in the statement."""

    nonce: Nonce


class AckBody(WireStruct):
    """Every message up to and including ``seq`` is stored (cumulative)."""

    seq: SeqOrZero


class ErrorBody(WireStruct):
    """A coded error; ``ref_seq`` names the reliable message it is about, if any."""

    code: Code
    detail: Text = ""
    ref_seq: SeqOrZero | None = None
