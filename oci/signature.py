"""cosign-compatible signatures, checked against pinned public keys.

cosign stores the signatures of ``repo@sha256:<hex>`` as the manifest tagged
``sha256-<hex>.sig`` in the same repository. Each of its layers is a simple-signing payload
(JSON naming the digest and the repository) with the signature, base64, in the layer's
``dev.cosignproject.cosign/signature`` annotation: ECDSA P-256 over SHA-256 (DER), as
``cosign generate-key-pair`` makes, or Ed25519. One layer that verifies under one pinned
key, and names this digest and this repository, is enough.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from oci.client import RegistryClient
from oci.errors import ImageError, ImageRefused, OciError
from oci.manifest import Manifest, decode
from oci.reference import DIGEST, parse_reference

__all__ = [
    "SIGNATURE_ANNOTATION",
    "SIMPLE_SIGNING",
    "PublicKey",
    "load_public_key",
    "signature_tag",
    "verify_signature",
]

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
# Each layer costs a blob fetch: a hostile artifact with thousands of them is cut short.
_MAX_LAYERS = 32


class _Identity(msgspec.Struct, frozen=True, rename="kebab"):
    docker_reference: str


class _Image(msgspec.Struct, frozen=True, rename="kebab"):
    docker_manifest_digest: str


class _Critical(msgspec.Struct, frozen=True):
    identity: _Identity
    image: _Image
    type: str


class _Payload(msgspec.Struct, frozen=True):
    critical: _Critical


def load_public_key(pem: bytes) -> PublicKey:
    """A pinned key from PEM (``cosign.pub``): ECDSA P-256 or Ed25519, else ValueError."""
    key = serialization.load_pem_public_key(pem)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ValueError("a signing key is ECDSA P-256 or Ed25519")


def signature_tag(digest: str) -> str:
    """The tag cosign gives the signatures of ``digest``: ``sha256-<hex>.sig``."""
    return digest.replace(":", "-", 1) + ".sig"


def verify_signature(
    client: RegistryClient, repository: str, digest: str, keys: Sequence[PublicKey]
) -> None:
    """Pass if ``repository@digest`` carries a signature under one of ``keys``.

    Raises ImageRefused ``signature_missing`` (no signature artifact) or
    ``signature_invalid`` (none of its layers verifies for this digest and repository);
    the registry's own failures come through as they are.
    """
    if not keys:
        raise ValueError("verify_signature needs at least one pinned key")
    ref = parse_reference(repository)
    if ref.tag or ref.digest or not DIGEST.fullmatch(digest):
        raise OciError("bad_reference", f"{repository!r} @ {digest!r}: a repository and a digest")
    try:
        fetched = client.manifest(ref, signature_tag(digest))
    except ImageError as error:
        if error.code == "image_not_found":
            raise ImageRefused("signature_missing", f"{ref.repository}@{digest}") from error
        raise
    try:
        manifest = decode(fetched.body, Manifest)
    except ImageError as error:
        raise ImageRefused("signature_invalid", f"{ref.repository}: {error.detail}") from error
    for layer in manifest.layers[:_MAX_LAYERS]:
        encoded = (layer.annotations or {}).get(SIGNATURE_ANNOTATION)
        if layer.media_type != SIMPLE_SIGNING or encoded is None:
            continue
        try:
            signature = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            continue
        payload = client.blob(ref, layer.digest, layer.size)
        # Only a payload whose signature holds is parsed: the rest is attacker text.
        if any(_verifies(key, signature, payload) for key in keys) and _names(
            payload, ref.repository, digest
        ):
            return
    raise ImageRefused("signature_invalid", f"{ref.repository}@{digest}: no valid signature")


def _verifies(key: PublicKey, signature: bytes, payload: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, payload)
        else:
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _names(payload: bytes, repository: str, digest: str) -> bool:
    """Whether the signed payload is about this digest in this repository."""
    try:
        critical = msgspec.json.decode(payload, type=_Payload).critical
        named = parse_reference(critical.identity.docker_reference)
    except (msgspec.DecodeError, OciError):
        return False
    return (
        critical.type == "cosign container image signature"
        and critical.image.docker_manifest_digest == digest
        and named.repository == repository
        and named.digest is None
    )
