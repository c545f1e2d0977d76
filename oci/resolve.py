"""A reference (tag or digest) to the one image manifest that runs on a platform."""

from __future__ import annotations

from dataclasses import dataclass
from platform import machine as _machine

from oci.client import RegistryClient
from oci.errors import ImageError, OciError
from oci.manifest import (
    CONFIG_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    ImageConfig,
    Index,
    Manifest,
    decode,
)
from oci.reference import Reference, parse_reference

__all__ = ["Resolved", "host_platform", "resolve"]


@dataclass(frozen=True)
class Resolved:
    """The image manifest a reference names on a platform.

    ``digest`` is the manifest's (computed over its bytes), not an index's: what the engine
    reports as the image's RepoDigest after pulling ``pinned``. The unpacked size is not in a
    registry's answer; only the engine knows it after the pull.
    """

    repository: str
    digest: str
    size_compressed: int
    media_type: str

    @property
    def pinned(self) -> str:
        """``repository@sha256:...``, the reference an offer carries."""
        return f"{self.repository}@{self.digest}"


def host_platform() -> str:
    """This machine's platform as an image index names it: ``linux/amd64``, ``linux/arm64``."""
    arch = _machine().lower()
    return "linux/" + {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch)


def resolve(client: RegistryClient, reference: str, platform: str = "linux/amd64") -> Resolved:
    """Resolve ``reference`` to its image manifest for ``platform`` ("os/arch[/variant]")."""
    ref = parse_reference(reference)
    wanted = _platform(platform)
    fetched = client.manifest(ref)
    if fetched.media_type in INDEX_TYPES:
        index = decode(fetched.body, Index)
        entry = next(
            (
                m
                for m in index.manifests
                if m.platform is not None
                and (m.platform.os, m.platform.architecture) == wanted[:2]
                and wanted[2] in (None, m.platform.variant)
            ),
            None,
        )
        if entry is None:
            raise ImageError("no_matching_platform", f"{ref.repository}: nothing for {platform}")
        fetched = client.manifest(ref, entry.digest)
        if len(fetched.body) != entry.size:
            raise ImageError("digest_mismatch", f"{ref.repository}@{entry.digest}: wrong size")
        if fetched.media_type not in MANIFEST_TYPES:
            raise ImageError("unsupported_media_type", f"{ref.repository}: {fetched.media_type}")
        manifest = decode(fetched.body, Manifest)
    elif fetched.media_type in MANIFEST_TYPES:
        manifest = decode(fetched.body, Manifest)
        _check_config(client, ref, manifest, wanted, platform)
    else:
        raise ImageError("unsupported_media_type", f"{ref.repository}: {fetched.media_type!r}")
    if manifest.config.media_type not in CONFIG_TYPES:
        raise ImageError("unsupported_media_type", f"{ref.repository}: not an image (config)")
    size = manifest.config.size + sum(layer.size for layer in manifest.layers)
    return Resolved(
        repository=ref.repository,
        digest=fetched.digest,
        size_compressed=size,
        media_type=fetched.media_type,
    )


def _check_config(
    client: RegistryClient,
    ref: Reference,
    manifest: Manifest,
    wanted: tuple[str, str, str | None],
    platform: str,
) -> None:
    """A single manifest says its platform in its config only: read it, and compare."""
    if manifest.config.media_type not in CONFIG_TYPES:
        raise ImageError("unsupported_media_type", f"{ref.repository}: not an image (config)")
    config = decode(client.blob(ref, manifest.config.digest, manifest.config.size), ImageConfig)
    if (config.os, config.architecture) != wanted[:2] or wanted[2] not in (None, config.variant):
        found = "/".join(p for p in (config.os, config.architecture, config.variant) if p)
        raise ImageError("no_matching_platform", f"{ref.repository} is {found}, not {platform}")


def _platform(text: str) -> tuple[str, str, str | None]:
    """``os/arch[/variant]`` as a triple (raises OciError ``bad_reference``)."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise OciError("bad_reference", f"{text!r} is not os/architecture[/variant]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None
