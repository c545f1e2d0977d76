"""Images from registries: references, the Distribution API v2, signatures and policy.

A library both sides use: the coordinator resolves a tag to the digest an offer pins, the
agent checks what it is about to pull. It imports nothing of the project's other packages.
Blocking calls (httpx, sync): run them through ``asyncio.to_thread`` from an event loop.

    client = RegistryClient(credentials={"host:5000": Credentials("u", "p")}, ca_file=ca)
    resolved = resolve_allowed(client, policy, "host:5000/models/llm:v1", "linux/amd64")
    resolved.pinned  # "host:5000/models/llm@sha256:..."
"""

from __future__ import annotations

from oci.client import MAX_BODY, Credentials, RegistryClient
from oci.errors import ImageError, ImageRefused, OciError, RegistryError
from oci.logins import read_logins
from oci.policy import ImagePolicy, check_repository, check_size, resolve_allowed
from oci.reference import Reference, parse_reference
from oci.resolve import Resolved, host_platform, resolve
from oci.signature import PublicKey, load_public_key, signature_tag, verify_signature

__all__ = [
    "MAX_BODY",
    "Credentials",
    "ImageError",
    "ImagePolicy",
    "ImageRefused",
    "OciError",
    "PublicKey",
    "Reference",
    "RegistryClient",
    "RegistryError",
    "Resolved",
    "check_repository",
    "check_size",
    "host_platform",
    "load_public_key",
    "parse_reference",
    "read_logins",
    "resolve",
    "resolve_allowed",
    "signature_tag",
    "verify_signature",
]
