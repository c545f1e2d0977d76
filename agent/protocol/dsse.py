"""DSSE envelopes around in-toto Statements: how a node signs what it reports.

An attestation is a DSSE v1 envelope (github.com/secure-systems-lab/dsse, envelope.md and
protocol.md) whose payload is an in-toto Statement v1 (github.com/in-toto/attestation,
spec/v1/statement.md), signed with the node's Ed25519 key. Two predicate types exist:

- :data:`PROFILE_PREDICATE`: subject = the node id with the SHA-256 of the profile's
  canonical JSON; predicate = ``{"nonce": <coordinator nonce>, "profile": {...}}``.
- :data:`RECEIPT_PREDICATE`: subject = the node id with the SHA-256 of the receipt's
  canonical JSON; predicate = ``{"receipt": {...}}``.

Canonical JSON is msgspec's encoding with keys sorted (:func:`canonical_json`). The
``verify_*`` functions are the one check that the coordinator and the tests share.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from agent.protocol import crypto
from agent.protocol.errors import AuthError

__all__ = [
    "PAYLOAD_TYPE",
    "PROFILE_PREDICATE",
    "RECEIPT_PREDICATE",
    "STATEMENT_TYPE",
    "Envelope",
    "Signature",
    "Statement",
    "Subject",
    "attest",
    "attest_profile",
    "attest_receipt",
    "canonical_json",
    "json_sha256",
    "pae",
    "profile_digest",
    "sign_envelope",
    "verify_attestation",
    "verify_envelope",
    "verify_payload",
    "verify_profile",
    "verify_profile_attestation",
    "verify_receipt",
]

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
PROFILE_PREDICATE = "https://gpu-agent.dev/attestation/hardware-profile/v1"
RECEIPT_PREDICATE = "https://gpu-agent.dev/attestation/job-receipt/v1"

T = TypeVar("T")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class Signature(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One signature of a DSSE envelope; ``keyid`` is an unauthenticated hint."""

    # Optional in DSSE (envelope.md: "empty fields may be omitted"), so it defaults.
    keyid: str = ""
    sig: str
    """Base64 of the signature over :func:`pae` of the payload type and payload."""


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A DSSE v1 JSON envelope; field names are the spec's."""

    payload: str
    """Base64 of the serialized body."""
    payloadType: str
    signatures: list[Signature]


class Subject(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a Statement is about: a name and its digests (``{"sha256": hex}``)."""

    name: str
    digest: dict[str, str]


class Statement(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, rename={"type": "_type"}):
    """An in-toto Statement v1; ``type`` is ``_type`` on the wire."""

    type: str
    subject: list[Subject]
    predicateType: str
    predicate: dict[str, Any] = msgspec.field(default_factory=dict)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's Pre-Authentication Encoding of a payload type and body (protocol.md)."""
    # LEN is the byte length of UTF8(type), not its character count.
    encoded = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(encoded), encoded, len(payload), payload)


def sign_envelope(
    payload: bytes, payload_type: str, key: crypto.PrivateKey, keyid: str
) -> Envelope:
    """An envelope around ``payload`` with one signature by ``key``."""
    sig = crypto.sign(key, pae(payload_type, payload))
    return Envelope(
        payload=crypto.b64encode(payload),
        payloadType=payload_type,
        signatures=[Signature(keyid=keyid, sig=crypto.b64encode(sig))],
    )


def _verified_keys(envelope: Envelope, trusted: Mapping[str, bytes]) -> tuple[bytes, set[bytes]]:
    """The payload and every trusted public key with a valid signature on it."""
    try:
        payload = crypto.b64decode(envelope.payload)
        message = pae(envelope.payloadType, payload)
    except ValueError as exc:
        # protocol.md: "Reject if decoding fails." (UnicodeEncodeError is a ValueError.)
        raise AuthError("bad_signature", f"undecodable envelope: {exc}") from None
    if not envelope.signatures:
        raise AuthError("untrusted_key", "the envelope carries no signature")
    accepted: set[bytes] = set()
    named_trusted = False
    for signature in envelope.signatures:
        try:
            sig = crypto.b64decode(signature.sig)
        except ValueError as exc:
            raise AuthError("bad_signature", f"undecodable signature: {exc}") from None
        # The keyid only narrows which keys to try (protocol.md: it MUST NOT be used for
        # security decisions); without one, every trusted key is a candidate.
        if signature.keyid:
            if signature.keyid not in trusted:
                continue
            named_trusted = True
            candidates = [trusted[signature.keyid]]
        else:
            candidates = list(trusted.values())
        accepted.update(k for k in candidates if crypto.verify(k, message, sig))
    if accepted:
        return payload, accepted
    if named_trusted:
        raise AuthError("bad_signature", "no signature by a trusted key verifies")
    raise AuthError("untrusted_key", "no signature by a trusted key")


def verify_envelope(envelope: Envelope, trusted: Mapping[str, bytes]) -> bytes:
    """The payload, if a key of ``trusted`` (keyid -> raw public key) signed it.

    Raises:
        AuthError: ``bad_signature`` when the envelope does not decode or the signature of
            a trusted keyid does not verify; ``untrusted_key`` when no signature names a
            trusted keyid (or none at all), or a keyid-less signature matches no trusted key.
    """
    return _verified_keys(envelope, trusted)[0]


def canonical_json(value: object) -> bytes:
    """The canonical JSON of ``value``: msgspec's encoding with keys sorted."""
    return msgspec.json.encode(value, order="sorted")


def json_sha256(value: object) -> str:
    """Lowercase hex SHA-256 of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def attest(
    subject_name: str,
    subject_digest: str,
    predicate_type: str,
    predicate: Mapping[str, Any] | msgspec.Struct,
    *,
    key: crypto.PrivateKey,
    keyid: str,
) -> Envelope:
    """A signed in-toto Statement about one subject with a sha256 digest (lowercase hex)."""
    if not _SHA256_HEX.fullmatch(subject_digest):
        raise ValueError(f"not a lowercase hex sha256 digest: {subject_digest!r}")
    raw = predicate if isinstance(predicate, msgspec.Struct) else dict(predicate)
    statement = Statement(
        type=STATEMENT_TYPE,
        subject=[Subject(name=subject_name, digest={"sha256": subject_digest})],
        predicateType=predicate_type,
        predicate=msgspec.to_builtins(raw),
    )
    return sign_envelope(canonical_json(statement), PAYLOAD_TYPE, key, keyid)


def verify_payload(
    envelope: Envelope,
    trusted: Mapping[str, bytes],
    payload_type: str,
    kind: type[T],
    *,
    code: str,
    what: str,
) -> T:
    """The payload of ``envelope`` decoded as ``kind``, if a trusted key signed it and it is
    of ``payload_type``.

    Raises:
        AuthError: as :func:`verify_envelope`; ``code`` when the payload type is another
            or the payload does not decode as ``kind`` (``what`` names it to people).
    """
    return _verified_payload(envelope, trusted, payload_type, kind, code=code, what=what)[0]


def _verified_payload(
    envelope: Envelope,
    trusted: Mapping[str, bytes],
    payload_type: str,
    kind: type[T],
    *,
    code: str,
    what: str,
) -> tuple[T, set[bytes]]:
    payload, keys = _verified_keys(envelope, trusted)
    # protocol.md verifies the signature first, then rejects unsupported payload types.
    if envelope.payloadType != payload_type:
        raise AuthError(code, f"payloadType is {envelope.payloadType!r}")
    try:
        return msgspec.json.decode(payload, type=kind), keys
    except msgspec.DecodeError as exc:
        raise AuthError(code, f"not {what}: {exc}") from None


def _verified_statement(
    envelope: Envelope, trusted: Mapping[str, bytes], predicate_type: str
) -> tuple[Statement, set[bytes]]:
    statement, keys = _verified_payload(
        envelope,
        trusted,
        PAYLOAD_TYPE,
        Statement,
        code="bad_statement",
        what="an in-toto Statement",
    )
    if statement.type != STATEMENT_TYPE:
        raise AuthError("bad_statement", f"_type is {statement.type!r}")
    if statement.predicateType != predicate_type:
        raise AuthError("bad_statement", f"predicateType is {statement.predicateType!r}")
    if not statement.subject:
        raise AuthError("bad_statement", "the statement has no subject")
    return statement, keys


def verify_attestation(
    envelope: Envelope, trusted: Mapping[str, bytes], predicate_type: str
) -> Statement:
    """The Statement in ``envelope`` if a trusted key signed it and it has that predicate.

    Raises:
        AuthError: as :func:`verify_envelope`, or ``bad_statement`` when the payload is not
            an in-toto Statement v1 of ``predicate_type`` with at least one subject.
    """
    return _verified_statement(envelope, trusted, predicate_type)[0]


def _node_subject(statement: Statement, keys: set[bytes], expected_node_id: str) -> Subject:
    """The statement's one subject, checked to be the expected node, signed by its key."""
    if len(statement.subject) != 1:
        raise AuthError("bad_statement", f"{len(statement.subject)} subjects, expected 1")
    subject = statement.subject[0]
    if subject.name != expected_node_id:
        raise AuthError("node_mismatch", f"subject is {subject.name!r}")
    # A trusted key of another node must not vouch for this one: the node id is derived
    # from the public key, so the signer's key must derive the subject's name.
    if expected_node_id not in {crypto.node_id(k) for k in keys}:
        raise AuthError("node_mismatch", f"not signed by the key of {expected_node_id}")
    return subject


def _check_digest(subject: Subject, value: object) -> None:
    if subject.digest.get("sha256") != json_sha256(value):
        raise AuthError("bad_statement", "the subject digest does not match the predicate")


def _as_json_object(value: Mapping[str, Any]) -> dict[str, Any]:
    """``value`` as it reads back from JSON, so that the verifier's digest is the signer's."""
    # Tuples, bytes, nested Structs... become lists, base64 strings, objects: the profile
    # is hashed and embedded in the one form that the verifier will see.
    decoded = msgspec.json.decode(canonical_json(value))
    if not isinstance(decoded, dict):
        raise TypeError(f"not a JSON object: {type(value).__name__}")
    return decoded


def profile_digest(profile: Mapping[str, Any]) -> str:
    """The digest an attestation of ``profile`` names as its subject's (``hello`` carries it:
    docs/protocol.md, "Re-attestation")."""
    return json_sha256(_as_json_object(profile))


def attest_profile(
    profile: dict[str, Any], nonce: str, node_id: str, key: crypto.PrivateKey, keyid: str
) -> Envelope:
    """A signed attestation of the hardware profile, answering the coordinator's nonce."""
    body = _as_json_object(profile)
    predicate = {"nonce": nonce, "profile": body}
    return attest(node_id, json_sha256(body), PROFILE_PREDICATE, predicate, key=key, keyid=keyid)


def verify_profile(
    envelope: Envelope, trusted: Mapping[str, bytes], expected_node_id: str
) -> tuple[str, dict[str, Any]]:
    """The nonce a profile attestation answers, and the profile, if ``expected_node_id``
    signed it: every check but the nonce's freshness, the signature verified once.

    The nonce is the caller's to check (fresh, issued to this node, not answered yet): the
    coordinator keeps a profile whose signature holds but whose nonce does not, as
    unverified. Verifying once matters at a coordinator's restart: every node reconnecting
    attests again, and the signature of an 8 KB profile is most of what its check costs.

    Raises:
        AuthError: as :func:`verify_attestation`; ``node_mismatch`` when the subject is
            another node or the signing key is not the node's; ``bad_statement`` when the
            predicate is not ``{"nonce", "profile"}`` or the subject digest does not match
            the profile.
    """
    statement, keys = _verified_statement(envelope, trusted, PROFILE_PREDICATE)
    predicate = statement.predicate
    nonce, profile = predicate.get("nonce"), predicate.get("profile")
    if predicate.keys() != {"nonce", "profile"} or not isinstance(nonce, str):
        raise AuthError("bad_statement", "the predicate is not {nonce, profile}")
    if not isinstance(profile, dict):
        raise AuthError("bad_statement", "the profile is not an object")
    _check_digest(_node_subject(statement, keys, expected_node_id), profile)
    return nonce, profile


def verify_profile_attestation(
    envelope: Envelope,
    trusted: Mapping[str, bytes],
    expected_nonce: str,
    expected_node_id: str,
) -> dict[str, Any]:
    """The attested profile, if ``expected_node_id`` signed it for ``expected_nonce``.

    Raises:
        AuthError: as :func:`verify_profile`; ``stale_nonce`` when the nonce is not the
            expected one.
    """
    nonce, profile = verify_profile(envelope, trusted, expected_node_id)
    if nonce != expected_nonce:
        raise AuthError("stale_nonce", "the profile answers another nonce")
    return profile


def attest_receipt(
    receipt: Mapping[str, Any], node_id: str, key: crypto.PrivateKey, keyid: str
) -> Envelope:
    """A signed attestation of a job receipt."""
    body = _as_json_object(receipt)
    predicate = {"receipt": body}
    return attest(node_id, json_sha256(body), RECEIPT_PREDICATE, predicate, key=key, keyid=keyid)


def verify_receipt(
    envelope: Envelope, trusted: Mapping[str, bytes], expected_node_id: str
) -> dict[str, Any]:
    """The receipt, if ``expected_node_id`` signed it.

    Raises:
        AuthError: as :func:`verify_attestation`; ``node_mismatch`` when the subject is
            another node or the signing key is not the node's; ``bad_statement`` when the
            predicate is not ``{"receipt"}`` or the subject digest does not match it.
    """
    statement, keys = _verified_statement(envelope, trusted, RECEIPT_PREDICATE)
    receipt = statement.predicate.get("receipt")
    if statement.predicate.keys() != {"receipt"} or not isinstance(receipt, dict):
        raise AuthError("bad_statement", "the predicate is not {receipt}")
    subject = _node_subject(statement, keys, expected_node_id)
    _check_digest(subject, receipt)
    return receipt
