"""The registry policy: allow patterns, the size cap, the keys it pins."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from oci import ImagePolicy, OciError, Resolved, check_repository, check_size, load_public_key

POLICY = ImagePolicy(allow=("registry.example.com/models/*", "docker.io/library/python"))


@pytest.mark.parametrize(
    "repository",
    ["registry.example.com/models/llm", "registry.example.com/models/a/b", "python"],
)
def test_a_repository_a_pattern_names_is_allowed(repository: str) -> None:
    check_repository(POLICY, repository)


@pytest.mark.parametrize(
    "repository",
    [
        "registry.example.com/other/llm",
        "registry.example.com.evil.org/models/llm",
        "evil.org/registry.example.com/models/llm",
        "docker.io/library/python2",
        "REGISTRY.example.com/models/llm",
    ],
)
def test_any_other_repository_is_refused(repository: str) -> None:
    with pytest.raises(OciError) as caught:
        check_repository(POLICY, repository)
    assert caught.value.code in ("registry_not_allowed", "bad_reference")


@pytest.mark.parametrize("pattern", ["registry.example.com*", "*/models/x", "*", "[rR]eg.com/x"])
def test_a_pattern_with_a_wildcard_registry_is_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="literal registry"):
        ImagePolicy(allow=(pattern,))


def test_an_image_over_the_compressed_cap_is_too_large() -> None:
    policy = ImagePolicy(allow=("r.example.com/*",), max_compressed_bytes=1000)
    image = Resolved("r.example.com/a", "sha256:" + "0" * 64, 1000, "m")
    check_size(policy, image)
    with pytest.raises(OciError) as caught:
        check_size(policy, Resolved("r.example.com/a", "sha256:" + "0" * 64, 1001, "m"))
    assert caught.value.code == "image_too_large"


def _pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_only_p256_and_ed25519_keys_can_be_pinned() -> None:
    load_public_key(_pem(ec.generate_private_key(ec.SECP256R1())))
    load_public_key(_pem(ed25519.Ed25519PrivateKey.generate()))
    for other in (ec.generate_private_key(ec.SECP384R1()), rsa.generate_private_key(65537, 2048)):
        with pytest.raises(ValueError, match="P-256 or Ed25519"):
            load_public_key(_pem(other))
