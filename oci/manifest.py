"""Manifests, indexes and image configs as the registry serves them, decoded strictly.

Unknown fields are allowed (registries and builders add their own); the fields this
library relies on are typed and bounded, and a body that breaks them is ``bad_manifest``.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec

from oci.errors import ImageError

__all__ = [
    "CONFIG_TYPES",
    "INDEX_TYPES",
    "MANIFEST_ACCEPT",
    "MANIFEST_TYPES",
    "Descriptor",
    "ImageConfig",
    "Index",
    "Manifest",
    "Platform",
    "decode",
    "media_type_of",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
CONFIG_TYPES = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
# Without the v1 schema types, a registry converts or refuses rather than answer schema 1.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])

T = TypeVar("T")

_Digest = Annotated[str, msgspec.Meta(pattern=r"^sha256:[0-9a-f]{64}$")]
_Size = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
_Short = Annotated[str, msgspec.Meta(max_length=255)]


class Platform(msgspec.Struct, frozen=True):
    """Where an index entry runs."""

    os: _Short
    architecture: _Short
    variant: _Short | None = None


class Descriptor(msgspec.Struct, frozen=True, rename="camel"):
    """A pointer to a blob or manifest: its media type, digest and size."""

    media_type: _Short
    digest: _Digest
    size: _Size
    platform: Platform | None = None
    annotations: dict[str, str] | None = None


class Manifest(msgspec.Struct, frozen=True, rename="camel"):
    """An image manifest (OCI or Docker v2 schema 2)."""

    schema_version: Annotated[int, msgspec.Meta(ge=2, le=2)]
    config: Descriptor
    layers: Annotated[list[Descriptor], msgspec.Meta(max_length=4096)]
    media_type: _Short | None = None


class Index(msgspec.Struct, frozen=True, rename="camel"):
    """An image index (OCI) or manifest list (Docker)."""

    schema_version: Annotated[int, msgspec.Meta(ge=2, le=2)]
    manifests: Annotated[list[Descriptor], msgspec.Meta(max_length=4096)]
    media_type: _Short | None = None


class ImageConfig(msgspec.Struct, frozen=True):
    """The part of an image config that says where the image runs."""

    os: _Short
    architecture: _Short
    variant: _Short | None = None


class _Probe(msgspec.Struct, frozen=True, rename="camel"):
    media_type: str | None = None


def media_type_of(body: bytes, content_type: str | None) -> str:
    """The body's own ``mediaType`` if it has one, else the Content-Type header's."""
    try:
        declared = msgspec.json.decode(body, type=_Probe).media_type
    except msgspec.DecodeError as error:
        raise ImageError("bad_manifest", f"not a JSON object: {error}") from error
    header = (content_type or "").split(";")[0].strip()
    return declared or header


def decode(body: bytes, kind: type[T]) -> T:
    """Decode ``body`` as ``kind`` (raises ImageError ``bad_manifest``)."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as error:
        raise ImageError("bad_manifest", f"{kind.__name__}: {error}") from error
