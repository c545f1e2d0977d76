"""The OCI registry library's errors: one tree, grouped by how a caller reacts.

OciError                    base; ``code`` is stable and may travel to the coordinator
    bad_reference           the text is not an image reference (or an os/arch platform)
    bad_logins_file         a registry logins file is missing, unsafe or malformed
    RegistryError           talking to the registry failed; worth a retry later
        registry_unreachable    no connection, TLS refused, a 5xx, a body cut short
        registry_auth_failed    the credentials (or their absence) were refused
        pull_timeout            the registry stalled, or took longer than allowed
    ImageError              the registry answered, but not with a usable image
        image_not_found         no such repository, tag or digest
        digest_mismatch         the bytes are not those named (digest or size)
        manifest_too_large      a manifest or JSON body over the cap
        bad_manifest            a body that is not a valid manifest, index or JSON
        unsupported_media_type  a manifest kind or image config this library does not run
        no_matching_platform    nothing for the wanted os/architecture
    ImageRefused            the image is fine, the policy says no
        registry_not_allowed    no allow pattern names the repository
        image_too_large         over the largest compressed size
        signature_missing       no ``sha256-<hex>.sig`` artifact
        signature_invalid       no layer of it verifies for this digest under a pinned key
"""

from __future__ import annotations

__all__ = ["ImageError", "ImageRefused", "OciError", "RegistryError"]


class OciError(Exception):
    """A registry or image failure; ``code`` is stable, ``detail`` is for humans.

    No detail ever carries a credential or a token.
    """

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class RegistryError(OciError):
    """Talking to the registry failed (unreachable, refused credentials, stalled)."""


class ImageError(OciError):
    """The registry answered with something that is not the usable image asked for."""


class ImageRefused(OciError):
    """The image breaks the policy: registry, size or signature."""
