"""Ed25519 signing, the names derived from a public key, and DSSE's base64."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol import crypto

# RFC 8032 section 7.1, TEST 1: secret key, public key, and the signature of "".
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


@pytest.fixture
def rfc_key() -> crypto.PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET)


def test_signing_matches_the_rfc8032_test_vector(rfc_key: crypto.PrivateKey) -> None:
    assert crypto.public_key_bytes(rfc_key) == RFC8032_PUBLIC
    assert crypto.sign(rfc_key, b"") == RFC8032_SIGNATURE
    assert crypto.verify(RFC8032_PUBLIC, b"", RFC8032_SIGNATURE)


def test_node_id_is_stable_for_a_fixed_key() -> None:
    expected = "node-" + base64.b32encode(hashlib.sha256(RFC8032_PUBLIC).digest()).decode()
    assert crypto.node_id(RFC8032_PUBLIC) == expected.lower()[:31]
    assert crypto.node_id(RFC8032_PUBLIC) == "node-eh7ddx5bksrgcytl7bkai36se4"


def test_key_id_is_the_hex_of_the_first_16_bytes_of_the_key_hash() -> None:
    assert crypto.key_id(RFC8032_PUBLIC) == "ed25519:21fe31dfa154a261626bf854046fd227"
    assert crypto.key_id(RFC8032_PUBLIC) == (
        "ed25519:" + hashlib.sha256(RFC8032_PUBLIC).hexdigest()[:32]
    )


def test_different_keys_have_different_names() -> None:
    one, two = (crypto.public_key_bytes(crypto.generate_private_key()) for _ in range(2))
    assert crypto.node_id(one) != crypto.node_id(two)
    assert crypto.key_id(one) != crypto.key_id(two)


@pytest.mark.parametrize("size", [0, 31, 33])
def test_names_refuse_a_public_key_of_the_wrong_size(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.node_id(b"\x01" * size)
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.key_id(b"\x01" * size)


def test_verify_accepts_a_fresh_signature() -> None:
    key = crypto.generate_private_key()
    assert crypto.verify(crypto.public_key_bytes(key), b"data", crypto.sign(key, b"data"))


def test_verify_refuses_tampered_data_and_another_key() -> None:
    key, other = crypto.generate_private_key(), crypto.generate_private_key()
    signature = crypto.sign(key, b"data")
    assert not crypto.verify(crypto.public_key_bytes(key), b"datA", signature)
    assert not crypto.verify(crypto.public_key_bytes(other), b"data", signature)


@pytest.mark.parametrize(
    ("public_key", "signature"),
    [
        (b"", RFC8032_SIGNATURE),
        (RFC8032_PUBLIC[:31], RFC8032_SIGNATURE),
        (RFC8032_PUBLIC + b"\x00", RFC8032_SIGNATURE),
        (RFC8032_PUBLIC, b""),
        (RFC8032_PUBLIC, RFC8032_SIGNATURE[:63]),
        (RFC8032_PUBLIC, RFC8032_SIGNATURE + b"\x00"),
        (RFC8032_PUBLIC, b"\xff" * 64),
        (b"\xff" * 32, RFC8032_SIGNATURE),
    ],
)
def test_verify_returns_false_on_malformed_input(public_key: bytes, signature: bytes) -> None:
    assert crypto.verify(public_key, b"", signature) is False


def test_private_key_pem_is_unencrypted_pkcs8_and_loads_back() -> None:
    key = crypto.generate_private_key()
    pem = crypto.private_key_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = crypto.load_private_key_pem(pem)
    assert crypto.public_key_bytes(loaded) == crypto.public_key_bytes(key)


def test_loading_a_pem_refuses_garbage_other_key_types_and_encrypted_keys() -> None:
    with pytest.raises(ValueError, match="PEM"):
        crypto.load_private_key_pem(b"not a key")
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="not an Ed25519 key"):
        crypto.load_private_key_pem(ec_pem)
    encrypted = crypto.generate_private_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ValueError, match="PEM"):
        crypto.load_private_key_pem(encrypted)


def test_b64encode_is_standard_padded_base64() -> None:
    assert crypto.b64encode(b"\xfb\xff\xbf>?") == "+/+/Pj8="


@pytest.mark.parametrize("text", ["+/+/Pj8=", "-_-_Pj8=", "+/+/Pj8", "-_-_Pj8"])
def test_b64decode_accepts_both_dsse_alphabets_padded_or_not(text: str) -> None:
    assert crypto.b64decode(text) == b"\xfb\xff\xbf>?"


@pytest.mark.parametrize("text", ["+_+_Pj8=", "a", "aGk==", "aG k=", "aGk=\n", "é", "a*b="])
def test_b64decode_refuses_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match="base64"):
        crypto.b64decode(text)
