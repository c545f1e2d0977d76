"""Tags pinned at submission: an offer names its image by digest, so what a node runs is
what the coordinator signed, whatever the tag points to later.

A spec whose image is a tag (``registry.example.com/models/llm:v1``) is resolved through
the registry's HTTP API (:func:`oci.resolve`: the manifest's digest, computed over the
bytes received; an index resolved to the node's platform) and offered as
``repository@sha256:...``. An image already pinned (a digest, or a local image id
``sha256:...``) is left as it is. Resolution runs in a thread: the registry client blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordinator.errors import JobError
from oci import Credentials, OciError, RegistryClient, resolve
from sandbox.spec import ImageRef

__all__ = ["ImagePinner"]

_HINT = "; pin it yourself as name@sha256:<digest>, or as a local image id sha256:<id>"


class ImagePinner:
    """Resolves the tag of a submitted spec's image to the digest the offer carries."""

    def __init__(
        self,
        *,
        logins: Mapping[str, Credentials] | None = None,
        ca_file: Path | None = None,
        platform: str = "linux/amd64",
        stall_s: float = 30.0,
        deadline_s: float = 60.0,
    ) -> None:
        self._logins = dict(logins or {})
        self._ca_file = ca_file
        self._platform = platform
        self._stall_s = stall_s
        self._deadline_s = deadline_s

    async def pin(
        self, spec: dict[str, Any], logins: Mapping[str, Credentials] | None = None
    ) -> dict[str, Any]:
        """``spec`` with its image pinned by digest (a copy; the same when already pinned
        or when it has no usable image, which the spec's own checks then refuse).
        ``logins`` (a submitter's) go before the coordinator's own for their registries.

        Raises:
            JobError: the registry's code (``image_not_found``, ``registry_unreachable``,
                ``registry_auth_failed``, ``no_matching_platform``, ...), with a hint.
        """
        image = spec.get("image")
        if not isinstance(image, str):
            return spec
        try:
            if ImageRef.parse(image).is_pinned:
                return spec
        except ValueError:
            return spec  # the spec's checks say what is wrong with it
        pinned = await asyncio.to_thread(self._resolve, image, {**self._logins, **(logins or {})})
        return {**spec, "image": pinned}

    def _resolve(self, image: str, logins: Mapping[str, Credentials]) -> str:
        try:
            with RegistryClient(
                credentials=logins,
                ca_file=self._ca_file,
                stall=self._stall_s,
                deadline=self._deadline_s,
            ) as client:
                return resolve(client, image, self._platform).pinned
        except OciError as exc:
            raise JobError(exc.code, f"image {image!r}: {exc.detail}{_HINT}") from None
