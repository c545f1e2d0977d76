"""Ed25519 keys, signatures and the names derived from them: pure functions over bytes.

A node is named by its public key, so that a name cannot be claimed without the key:

- node id: ``"node-"`` + the first 26 characters of the lowercase, unpadded RFC 4648
  base32 of SHA-256(raw 32-byte public key): 130 bits, e.g. ``node-3ud5sjbodqtl6x...``.
- key id: ``"ed25519:"`` + the lowercase hex of the first 16 bytes of SHA-256(raw public
  key), e.g. ``ed25519:5f1e...`` (32 hex digits). Used as the DSSE ``keyid`` hint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import TypeAlias

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "PUBLIC_KEY_SIZE",
    "SIGNATURE_SIZE",
    "PrivateKey",
    "b64decode",
    "b64encode",
    "generate_private_key",
    "key_id",
    "load_private_key_pem",
    "node_id",
    "private_key_pem",
    "public_key_bytes",
    "sign",
    "verify",
]

PrivateKey: TypeAlias = Ed25519PrivateKey

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
_NODE_ID_CHARS = 26


def generate_private_key() -> PrivateKey:
    """A fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )


def private_key_pem(key: PrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def load_private_key_pem(data: bytes) -> PrivateKey:
    """An Ed25519 private key from unencrypted PEM; ValueError if it is not one."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError: the PEM is encrypted; UnsupportedAlgorithm: a key type we cannot load.
        raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"not an Ed25519 key but {type(key).__name__}")
    return key


def _check_public_key(public_key: bytes) -> None:
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key has 32 bytes, not {len(public_key)}")


def node_id(public_key: bytes) -> str:
    """The node id derived from a raw public key (see the module docstring)."""
    _check_public_key(public_key)
    digest = hashlib.sha256(public_key).digest()
    return "node-" + base64.b32encode(digest).decode("ascii").lower()[:_NODE_ID_CHARS]


def key_id(public_key: bytes) -> str:
    """The key id derived from a raw public key (see the module docstring)."""
    _check_public_key(public_key)
    return "ed25519:" + hashlib.sha256(public_key).digest()[:16].hex()


def sign(key: PrivateKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``data``."""
    return key.sign(data)


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s signature of ``data``; never raises."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def b64encode(data: bytes) -> str:
    """Standard, padded base64 (RFC 4648 section 4), as DSSE signers commonly write."""
    return base64.b64encode(data).decode("ascii")


_URL_SAFE = str.maketrans("-_", "+/")


def b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not; ValueError on anything else.

    DSSE (protocol.md) lets signers use either alphabet and says verifiers MUST accept
    both; a string that mixes the two alphabets is refused as malformed.
    """
    if ("-" in text or "_" in text) and ("+" in text or "/" in text):
        raise ValueError("base64 mixes the standard and URL-safe alphabets")
    text = text.translate(_URL_SAFE)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"malformed base64: {exc}") from None
