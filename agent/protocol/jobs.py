"""Jobs on the wire: the coordinator's signed offer, the states a job goes through, and
the node's receipt.

An offer is a DSSE envelope (the same as :mod:`agent.protocol.dsse`'s) whose payload is
an :class:`Offer`, payload type :data:`OFFER_PAYLOAD_TYPE`, signed by a coordinator key the
agent pins. The job id travels twice, inside the signed payload and beside the envelope in
``job_offer``, so that an agent can name the offer it refuses even when the envelope is
forged; only the signed one counts, and the two must agree.

A receipt is what the node signs when a job ends (:func:`agent.protocol.dsse.attest_receipt`
around a :class:`Receipt`). Each names the digest of the node's previous receipt, so the
coordinator holds a hash chain: a receipt dropped or rewritten later breaks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from agent.protocol import crypto
from agent.protocol.dsse import Envelope, json_sha256, sign_envelope, verify_payload
from agent.protocol.errors import AuthError
from agent.protocol.uploads import Uploads, UploadTarget

__all__ = [
    "FINAL_STATES",
    "OFFER_PAYLOAD_TYPE",
    "JobState",
    "Offer",
    "OutputDigest",
    "Receipt",
    "RegistryLogin",
    "RegistryLogins",
    "UploadTarget",
    "offer_digest",
    "receipt_digest",
    "sign_offer",
    "verify_offer",
]

OFFER_PAYLOAD_TYPE: Final = "application/vnd.gpu-agent.job-offer+json"

JobState = Literal[
    "accepted",  # in the ledger, its GPUs reserved; nothing started yet
    "fetching",  # its inputs given by URL are being fetched (or found in the node's cache)
    "pulling",  # its image is being pulled (by digest) from its registry
    "refused",  # never accepted: bad signature, policy, capacity... (code says which)
    "running",  # the container's process started
    "starting",  # a service's server started; not answering its readiness check yet
    "ready",  # a service that answers: requests may go to it
    "unhealthy",  # a ready service that failed a liveness check: no new requests
    "restarting",  # a service's server ended or failed its checks; it starts again
    "stopped",  # a service that ended: lease over, stopped, restart limit (code says which)
    "uploading",  # it ended; its outputs are being uploaded, its receipt waits for them
    "completed",  # exited 0
    "failed",  # exited non-zero, or broke a limit it was given (code says which)
    "timeout",  # ran past its timeout and was stopped
    "oom_killed",  # the kernel killed it for memory
    "cancelled",  # the coordinator cancelled it
    "interrupted",  # the agent stopped or crashed under it; it is never run again
    "preempted",  # an owner guard (idle, thermal, schedule) took the GPUs back
    "error",  # the agent could not run it (engine, image, host): code says which
]
#: States a job never leaves; each one comes with a receipt, except ``refused``.
FINAL_STATES: Final = frozenset(
    {"refused", "completed", "failed", "timeout", "oom_killed", "stopped"}
    | {"cancelled", "interrupted", "preempted", "error"}
)

_Name = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@/+=-]+(?!\n)$")]
_JobId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(?!\n)$")]
_Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}(?!\n)$")]
# A registry as an image reference names it: host[:port], lower case.
_RegistryHost = Annotated[
    str, Meta(pattern=r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?(?!\n)$")
]
# Printable ASCII: a login goes into an HTTP header (base64'd JSON for the engine).
_Secret = Annotated[str, Meta(min_length=1, max_length=4096, pattern=r"^[\x20-\x7e]+(?!\n)$")]


class RegistryLogin(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A short-lived login to the registry of an offer's image (a token the coordinator
    had issued for this pull). Its ``repr`` hides the password."""

    username: Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[\x20-\x7e]+(?!\n)$")]
    password: _Secret

    def __repr__(self) -> str:
        return f"RegistryLogin(username={self.username!r}, password=<hidden>)"


#: What :class:`Offer` carries: one login at most, for the registry of its image.
RegistryLogins = Annotated[dict[_RegistryHost, RegistryLogin], Meta(max_length=1)]


class Offer(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """What a coordinator signs to offer one job to one node.

    Attributes:
        job_id: unique per coordinator; the agent runs one job id at most once.
        node_id: the node it is for: an offer for another node is refused.
        spec: the workload spec (docs/workload-spec.md), as a JSON object.
        issued_at: seconds since the epoch, the coordinator's clock.
        expires_at: after this the agent refuses it (``offer_expired``): an offer that
            reaches an agent back from a long time offline is not run blindly.
        uploads: output path -> where the node PUTs that output once the job ended
            (:mod:`agent.protocol.uploads`). Left out when empty, so an offer without
            targets encodes (and digests) as before the field existed.
        registry_logins: registry host -> a short-lived login for pulling the spec's
            image (only its registry may be named; the node's own logins are used when
            there is none). Shown by nothing: the read API redacts an offer that has one.
    """

    job_id: _JobId
    node_id: _Name
    spec: dict[str, Any]
    issued_at: float
    expires_at: float
    uploads: Uploads = {}
    registry_logins: RegistryLogins = {}


class OutputDigest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One output file the job left, as collected."""

    path: str
    status: str
    size_bytes: int = 0
    sha256: str | None = None


class Receipt(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the node attests about a job that ended (signed as a DSSE in-toto Statement).

    ``prev_receipt`` is :func:`receipt_digest` of the node's previous receipt ("" for the
    first), ``offer_sha256`` is :func:`offer_digest` of the offer it ran. Times are seconds
    since the epoch; resource figures are None where they could not be measured.
    """

    job_id: _JobId
    node_id: _Name
    state: JobState
    code: str = ""
    offer_sha256: _Sha256
    spec_digest: str
    image_id: str | None = None
    gpus: list[str] = []
    exit_code: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    outputs: list[OutputDigest] = []
    log_sha256: str = ""
    log_bytes: int = 0
    log_dropped_bytes: int = 0
    prev_receipt: Annotated[str, Meta(pattern=r"^([0-9a-f]{64})?(?!\n)$")] = ""


def sign_offer(offer: Offer, key: crypto.PrivateKey, keyid: str) -> Envelope:
    """The envelope a coordinator sends in ``job_offer``."""
    return sign_envelope(msgspec.json.encode(offer), OFFER_PAYLOAD_TYPE, key, keyid)


def verify_offer(
    envelope: Envelope,
    trusted: Mapping[str, bytes],
    *,
    job_id: str,
    node_id: str,
    now: float,
) -> Offer:
    """The offer in ``envelope``, if a trusted coordinator key signed it for this node.

    Args:
        job_id: the id named beside the envelope; the signed one must be the same.

    Raises:
        AuthError: as :func:`~agent.protocol.dsse.verify_envelope`; ``bad_offer`` when the
            payload type or payload is not an offer or names another job id;
            ``node_mismatch`` when it is for another node; ``offer_expired`` when
            ``now`` is past its expiry.
    """
    offer = verify_payload(
        envelope, trusted, OFFER_PAYLOAD_TYPE, Offer, code="bad_offer", what="a job offer"
    )
    if offer.job_id != job_id:
        raise AuthError("bad_offer", f"signed for job {offer.job_id!r}, sent as {job_id!r}")
    if offer.node_id != node_id:
        raise AuthError("node_mismatch", f"the offer is for {offer.node_id!r}")
    if now > offer.expires_at:
        raise AuthError("offer_expired", f"expired {now - offer.expires_at:.0f} s ago")
    return offer


def offer_digest(offer: Offer) -> str:
    """Lowercase hex SHA-256 of the offer's canonical JSON: what a receipt names."""
    return json_sha256(offer)


def receipt_digest(receipt: Receipt | Mapping[str, Any]) -> str:
    """Lowercase hex SHA-256 of a receipt's canonical JSON: the next receipt's
    ``prev_receipt``. The same whether given the struct or its JSON object."""
    return json_sha256(receipt)
