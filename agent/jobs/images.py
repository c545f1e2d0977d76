"""The node's own checks of a job's image before it is pulled: how large, signed by whom.

The sandbox's admission policy has said where an image may come from (``allowed_images``);
the engine will check the bytes it pulls against the digest. What only the registry can
tell is checked here, through :mod:`oci`, for an image pinned by digest in a repository:
its compressed size (``policy.max_image_bytes``) and, when the policy pins signing keys
(``policy.image_signature_keys``), a cosign-style signature of that very digest under one
of them (``signature_missing``, ``signature_invalid``). A local image id (an image the
owner built) is the owner's business and is not checked. Images whose signature verified
are remembered for the life of the process, so a cached image does not ask again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.protocol.jobs import Offer
from oci import (
    Credentials,
    ImagePolicy,
    PublicKey,
    RegistryClient,
    check_size,
    load_public_key,
    resolve,
    verify_signature,
)
from sandbox.engine_types import RegistryAuth
from sandbox.spec import ImageRef

__all__ = ["ImageGate", "engine_logins", "load_keys", "offer_logins"]


def engine_logins(logins: Mapping[str, Credentials]) -> dict[str, RegistryAuth]:
    """The logins as the engine takes them for image pulls (``X-Registry-Auth``)."""
    return {
        host: RegistryAuth(username=login.username, password=login.password, serveraddress=host)
        for host, login in logins.items()
    }


def offer_logins(offer: Offer) -> dict[str, Credentials]:
    """The short-lived logins an offer carries (for its image's registry alone)."""
    return {
        host: Credentials(login.username, login.password)
        for host, login in offer.registry_logins.items()
    }


def load_keys(pems: Sequence[str]) -> tuple[PublicKey, ...]:
    """The policy's signing keys (PEM public keys: ECDSA P-256, as cosign makes, or
    Ed25519).

    Raises:
        ValueError: a key that is not one of those, naming which.
    """
    keys = []
    for index, pem in enumerate(pems):
        try:
            keys.append(load_public_key(pem.encode()))
        except ValueError as exc:
            raise ValueError(f"image_signature_keys[{index}]: {exc}") from None
    return tuple(keys)


class ImageGate:
    """Checks an image by digest at its registry before the job's pull."""

    def __init__(
        self,
        *,
        keys: Sequence[PublicKey] = (),
        max_bytes: int | None = None,
        logins: Mapping[str, Credentials] | None = None,
        ca_file: Path | None = None,
        platform: str = "linux/amd64",
    ) -> None:
        self._policy = ImagePolicy(allow=(), max_compressed_bytes=max_bytes, keys=tuple(keys))
        self._logins = dict(logins or {})
        self._ca_file = ca_file
        self._platform = platform
        self._passed: set[str] = set()

    @property
    def active(self) -> bool:
        """Whether there is anything to check."""
        return bool(self._policy.keys) or self._policy.max_compressed_bytes is not None

    async def check(self, ref: ImageRef, logins: Mapping[str, Credentials] | None = None) -> None:
        """Check ``ref`` if it is pinned in a repository and the policy asks anything;
        ``logins`` (an offer's) go before the node's own for their registries.

        Raises:
            OciError: ``image_too_large``, ``signature_missing``, ``signature_invalid``,
                or the registry's failure (``registry_unreachable``, ...).
        """
        if not self.active or ref.repository is None or ref.digest is None:
            return
        pinned = f"{ref.repository}@{ref.digest}"
        if pinned not in self._passed:
            await asyncio.to_thread(self._check, pinned, {**self._logins, **(logins or {})})
            self._passed.add(pinned)

    def _check(self, pinned: str, logins: Mapping[str, Credentials]) -> None:
        with RegistryClient(credentials=logins, ca_file=self._ca_file) as client:
            resolved = resolve(client, pinned, self._platform)
            check_size(self._policy, resolved)
            if self._policy.keys:
                verify_signature(client, resolved.repository, resolved.digest, self._policy.keys)
