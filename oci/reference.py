"""Image references, normalised as Docker does ("python" is "docker.io/library/python").

The same rules as ``sandbox.spec.ImageRef`` (tests/unit/test_oci_reference.py holds the two
to one table), kept here because this library imports nothing of the sandbox.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from oci.errors import OciError

__all__ = ["Reference", "parse_reference"]

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class Reference:
    """A parsed reference: ``registry`` ("docker.io", "host:5000"), ``path`` ("library/python")."""

    registry: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        """The normalised repository name, registry first: "docker.io/library/python"."""
        return f"{self.registry}/{self.path}"

    @property
    def api_host(self) -> str:
        """Where the registry's HTTP API answers (Docker Hub's is not its name)."""
        return "registry-1.docker.io" if self.registry == "docker.io" else self.registry

    @property
    def target(self) -> str:
        """What the manifests endpoint is asked for: the digest if any, else the tag."""
        return self.digest or self.tag or "latest"


def parse_reference(text: str) -> Reference:
    """Parse ``name[:tag][@sha256:<hex>]`` (raises OciError ``bad_reference``)."""
    # The sandbox reads anything so prefixed as a local image id, which no registry serves.
    if text.startswith("sha256:"):
        raise OciError("bad_reference", f"{text!r} is an image id, not a registry reference")
    name, at, digest = text.partition("@")
    if at and not DIGEST.fullmatch(digest):
        raise OciError("bad_reference", f"{text!r}: a digest is 'sha256:' and 64 lower-case hex")
    tag = None
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise OciError("bad_reference", f"{text!r}: {tag!r} is not a valid tag")
    # Docker refuses such a name too: it reads as an image id, which no registry serves.
    if _HEX64.fullmatch(name):
        raise OciError("bad_reference", f"{text!r}: a bare 64-hex-digit name reads as an id")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _DOMAIN.fullmatch(first):
            raise OciError("bad_reference", f"{text!r}: {first!r} is not a valid registry")
        registry, path = first, rest
    else:
        registry, path = "docker.io", name
    if registry == "index.docker.io":
        registry = "docker.io"
    if registry == "docker.io" and "/" not in path:
        path = f"library/{path}"
    if not _PATH.fullmatch(path) or len(name) > 255:
        raise OciError("bad_reference", f"{text!r} is not a valid image name")
    return Reference(registry=registry, path=path, tag=tag, digest=digest or None)
