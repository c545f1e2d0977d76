"""What a node or a coordinator accepts from registries: where from, how large, signed by whom.

Patterns are ``fnmatch``-style over the normalised repository ("registry.example.com/models/*";
``*`` crosses "/" as well). The registry part of a pattern is literal: "registry.example.com*"
would also match "registry.example.com.evil.org", so it is refused as a pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from oci.client import RegistryClient
from oci.errors import ImageRefused
from oci.reference import parse_reference
from oci.resolve import Resolved, resolve
from oci.signature import PublicKey, verify_signature

__all__ = ["ImagePolicy", "check_repository", "check_size", "resolve_allowed"]

_WILD = frozenset("*?[]")


@dataclass(frozen=True)
class ImagePolicy:
    """``allow``: repository patterns; ``max_compressed_bytes``: None for no cap;
    ``keys``: pinned signing keys, a signature required when there is one."""

    allow: tuple[str, ...]
    max_compressed_bytes: int | None = None
    keys: tuple[PublicKey, ...] = ()

    def __post_init__(self) -> None:
        for pattern in self.allow:
            registry, slash, _ = pattern.partition("/")
            if not slash or not registry or _WILD & set(registry):
                raise ValueError(f"{pattern!r}: a pattern starts with a literal registry and '/'")


def check_repository(policy: ImagePolicy, repository: str) -> None:
    """Refuse ``registry_not_allowed`` unless a pattern names the (normalised) repository."""
    name = parse_reference(repository).repository
    if not any(fnmatchcase(name, pattern) for pattern in policy.allow):
        raise ImageRefused("registry_not_allowed", f"{name} is not in the allowed registries")


def check_size(policy: ImagePolicy, resolved: Resolved) -> None:
    """Refuse ``image_too_large`` over the policy's largest compressed size."""
    cap = policy.max_compressed_bytes
    if cap is not None and resolved.size_compressed > cap:
        raise ImageRefused(
            "image_too_large", f"{resolved.pinned}: {resolved.size_compressed} > {cap} bytes"
        )


def resolve_allowed(
    client: RegistryClient, policy: ImagePolicy, reference: str, platform: str = "linux/amd64"
) -> Resolved:
    """Resolve ``reference`` and apply the whole policy: where from, size, signature.

    The repository is checked before any request, so a refused registry sees no traffic.
    """
    ref = parse_reference(reference)
    check_repository(policy, ref.repository)
    resolved = resolve(client, reference, platform)
    check_size(policy, resolved)
    if policy.keys:
        verify_signature(client, resolved.repository, resolved.digest, policy.keys)
    return resolved
