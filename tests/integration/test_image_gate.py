"""The node's own checks of an image at its registry before the pull: its compressed size
and a cosign-style signature under a pinned key, against Debian's real registry."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.registry import LocalRegistry, RegistryApi, push_busybox, running_registry, sign_image

from agent.jobs.images import ImageGate, load_keys
from oci import Credentials, OciError
from sandbox.spec import ImageRef

PATH = "gate/busybox"


@dataclass(frozen=True)
class Images:
    registry: LocalRegistry
    signed: ImageRef
    unsigned: ImageRef
    key_pem: str
    other_pem: str


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _push(registry: LocalRegistry, tag: str, blob: bytes, workdir: Path) -> ImageRef:
    return ImageRef.parse(push_busybox(registry, tag, blob, workdir))


@pytest.fixture(scope="module")
def images(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    workdir = tmp_path_factory.mktemp("gate")
    with running_registry(workdir) as registry:
        signed = _push(registry, f"{registry.host}/{PATH}:signed", b"signed", workdir)
        unsigned = _push(registry, f"{registry.host}/{PATH}:unsigned", b"unsigned", workdir)
        key, other = (
            ec.generate_private_key(ec.SECP256R1()),
            ec.generate_private_key(ec.SECP256R1()),
        )
        assert signed.digest is not None
        sign_image(RegistryApi(registry), PATH, signed.digest, key)
        yield Images(registry, signed, unsigned, _pem(key), _pem(other))


def _gate(images: Images, *, keys: tuple[str, ...] = (), max_bytes: int | None = None) -> ImageGate:
    login = Credentials(images.registry.username, images.registry.password)
    return ImageGate(
        keys=load_keys(list(keys)),
        max_bytes=max_bytes,
        logins={images.registry.host: login},
        ca_file=images.registry.ca_file,
    )


async def _refusal(gate: ImageGate, ref: ImageRef) -> str:
    with pytest.raises(OciError) as caught:
        await gate.check(ref)
    return caught.value.code


async def test_an_image_signed_under_a_pinned_key_passes(images: Images) -> None:
    await _gate(images, keys=(images.key_pem,)).check(images.signed)


async def test_an_unsigned_image_is_refused_when_keys_are_pinned(images: Images) -> None:
    code = await _refusal(_gate(images, keys=(images.key_pem,)), images.unsigned)
    assert code == "signature_missing"


async def test_a_signature_under_another_key_is_invalid(images: Images) -> None:
    code = await _refusal(_gate(images, keys=(images.other_pem,)), images.signed)
    assert code == "signature_invalid"


async def test_an_image_over_the_size_cap_is_refused(images: Images) -> None:
    assert await _refusal(_gate(images, max_bytes=1024), images.signed) == "image_too_large"
    await _gate(images, max_bytes=1 << 30).check(images.signed)


async def test_nothing_is_asked_without_a_policy_or_of_a_local_image(images: Images) -> None:
    # No keys and no cap: the gate does not reach the registry at all (its login is wrong).
    await ImageGate(logins={images.registry.host: Credentials("x", "y")}).check(images.unsigned)
    local = ImageRef.parse("sha256:" + "a" * 64)
    await _gate(images, keys=(images.key_pem,)).check(local)


def test_a_key_that_is_not_one_is_refused_by_its_place() -> None:
    with pytest.raises(ValueError, match=r"image_signature_keys\[0\]"):
        load_keys(["-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"])
