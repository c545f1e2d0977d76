"""The typed Docker engine client: each operation the sandbox asks of the engine, as a method.

The one engine boundary is two modules. :mod:`sandbox.docker_api` is the wire (HTTP over
the unix socket, the API version, the attach and wait streams) and knows no endpoint's
meaning; this module owns the endpoints, the shapes of what is sent and read
(:mod:`sandbox.engine_types`), and what each refusal means for the operation refused.
Why not grow ``docker_api`` into it: the wire is about 300 lines of framing that a
reader need not see to follow what the runner asks of the engine, and that does not
change when an operation does; the operations are tested apart from it (a scripted
engine for shapes and refusals, the real one for the rest). The shapes are a third,
pure module, so that the pure builders of a container's settings (``container``,
``gpu_mapping``) use them without importing any I/O. All three in one would be ~740
lines. Above this module the runner sees no URL, no HTTP status and no JSON key.

Errors: an engine that cannot be reached or answers garbage is ``EngineError``
``engine_unreachable`` / ``engine_error``; an answer of the wrong shape is
``engine_error``; refusals are mapped in :func:`_meaning`, the one place the engine's
statuses become the sandbox's outcomes (with :func:`_holds` for the refusals that
mean the wanted state holds already).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any, TypeVar

import msgspec

from sandbox.docker_api import Attachment, DockerClient, Response, quote_ref
from sandbox.engine_types import (
    ContainerConfig,
    ContainerInfo,
    ContainerSummary,
    CreatedContainer,
    EngineInfo,
    ImageInfo,
    NetworkConfig,
    NetworkSummary,
    PullMessage,
    RegistryAuth,
)
from sandbox.errors import EngineError, PullError, RunError, SandboxError

__all__ = ["Engine"]

_T = TypeVar("_T")
# A container's removal, retried: a runtime busy tearing it down refuses at first.
_REMOVE_ATTEMPTS = 5
_REMOVE_BACKOFF_S = 0.2
# A stop waits for the grace period and then for the kill; the engine answers after both.
_STOP_SLACK_S = 60.0
_log = logging.getLogger(__name__)

# What the engine's refusals mean, per operation. _DONE: the state the caller wants holds
# already (a stop of a stopped container, 304; a removal of a removed one, 404).
_DONE = frozenset({("stop", 304), ("remove", 404), ("remove_image", 404), ("remove_network", 404)})
# Refusals with a code of their own; every other is engine_error. Two operations mean the
# same whatever failed: a start (start_failed, see _meaning) and a kill (not delivered).
_CODES = {
    ("inspect_image", 404): "image_not_found",
    ("create", 404): "image_not_found",  # removed since it was inspected
    ("inspect", 404): "not_found",
}


class Engine:
    """The Docker engine, by operation; ``client`` is the wire it speaks over."""

    def __init__(self, client: DockerClient) -> None:
        self.client = client

    async def info(self) -> EngineInfo:
        """How the engine is set up (``GET /info``); negotiates the API version afresh."""
        await self.client.version()
        return await self._get("info", "/info", EngineInfo)

    def supports_cdi(self, info: EngineInfo) -> bool:
        """Whether device requests may name CDI devices: API 1.44 (Docker 25) or newer,
        and CDI switched on in the engine (opt-in before Docker 28), which ``/info`` shows
        by listing its CDI spec directories."""
        return self.client.api_version >= (1, 44) and bool(info.cdi_spec_dirs)

    async def inspect_image(self, reference: str) -> ImageInfo:
        """A local image, by reference or id; ``image_not_found`` if there is none."""
        return await self._get("inspect_image", f"/images/{quote_ref(reference)}/json", ImageInfo)

    async def pull(
        self,
        reference: str,
        *,
        auth: RegistryAuth | None = None,
        idle_timeout_s: float = 60.0,
        on_progress: Callable[[str, int, int], None] = lambda layer, done, total: None,
    ) -> None:
        """Pull ``reference`` (``repository@sha256:...``); ``on_progress(layer, done,
        total)`` as the engine reports each layer's download.

        The engine checks what it pulls against the digest it was asked for; a registry
        that serves other bytes fails the pull (``digest_mismatch``).

        Raises:
            PullError: ``image_not_found``, ``registry_auth_failed``,
                ``registry_unreachable``, ``digest_mismatch``, ``pull_timeout`` (no
                progress for ``idle_timeout_s``), ``disk_full``, ``pull_failed``.
        """
        headers = {}
        if auth is not None:
            encoded = base64.urlsafe_b64encode(msgspec.json.encode(auth)).decode()
            headers["X-Registry-Auth"] = encoded
        lines = self.client.stream_lines(
            "POST",
            "/images/create",
            params={"fromImage": reference},
            headers=headers,
            idle_timeout_s=idle_timeout_s,
        )
        try:
            async with aclosing(lines):
                async for line in lines:
                    try:
                        message = msgspec.json.decode(line, type=PullMessage)
                    except msgspec.DecodeError as exc:
                        raise PullError("pull_failed", f"unexpected answer: {exc}") from exc
                    if message.error or message.error_detail is not None:
                        detail = message.error or (
                            message.error_detail.message if message.error_detail else ""
                        )
                        raise PullError(_pull_code(detail), f"{reference}: {detail}")
                    progress = message.progress_detail
                    if message.status == "Downloading" and progress is not None:
                        on_progress(message.id, progress.current, progress.total)
        except EngineError as exc:
            if exc.code == "stream_stalled":
                raise PullError("pull_timeout", f"{reference}: {exc.detail}") from exc
            if exc.status is None:
                raise
            raise PullError(
                _pull_code(exc.detail, exc.status), f"{reference}: {exc.detail}"
            ) from exc

    async def create(self, name: str, config: ContainerConfig) -> str:
        """Create a container called ``name``; its id."""
        try:
            response = await self.client.request(
                "POST", "/containers/create", params={"name": name}, body=config
            )
        except EngineError as exc:
            raise _meaning("create", exc) from exc
        return _decode("create", response, CreatedContainer).id

    async def inspect(self, container_id: str) -> ContainerInfo:
        """A container's state and mounts; ``not_found`` if it is gone."""
        return await self._get("inspect", f"/containers/{container_id}/json", ContainerInfo)

    async def containers(self, label: str) -> list[ContainerSummary]:
        """Every container, running or not, that carries ``label`` (``name`` or ``name=value``)."""
        filters = msgspec.json.encode({"label": [label]}).decode()
        params = {"all": 1, "filters": filters}
        return await self._get("list", "/containers/json", list[ContainerSummary], params)

    def attach(self, container_id: str) -> AbstractAsyncContextManager[Attachment]:
        """The container's output stream; see :meth:`DockerClient.attach`."""
        return self.client.attach(container_id)

    async def arm_wait(self, container_id: str) -> Callable[[], Coroutine[Any, Any, None]]:
        """Register a wait for the container's next exit; return the call that awaits it.

        An exit right after (even before :meth:`start` returns) is not missed. How it
        ended is read by :meth:`inspect` afterwards.
        """
        collect = await self.client.wait_armed(container_id)

        async def exited() -> None:
            await collect()

        return exited

    async def start(self, container_id: str) -> None:
        """Start a created container; RunError ``start_failed`` if it does not start."""
        try:
            await self.client.request("POST", f"/containers/{container_id}/start")
        except EngineError as exc:
            raise _meaning("start", exc) from exc

    async def kill(self, container_id: str, signal: str = "SIGKILL") -> bool:
        """Send ``signal`` now; False if not delivered (it had stopped by itself, or the
        engine failed): a caller that must see it stopped then calls :meth:`stop`."""
        try:
            await self.client.request(
                "POST", f"/containers/{container_id}/kill", params={"signal": signal}
            )
        except EngineError:
            return False
        return True

    async def stop(self, container_id: str, grace_s: float) -> bool:
        """Its stop signal (SIGTERM), ``grace_s`` seconds, then SIGKILL; False if it had
        stopped already."""
        try:
            await self.client.request(
                "POST",
                f"/containers/{container_id}/stop",
                params={"t": int(grace_s)},
                timeout_s=grace_s + _STOP_SLACK_S,
            )
        except EngineError as exc:
            if _holds("stop", exc):
                return False
            raise _meaning("stop", exc) from exc
        return True

    async def remove_image(self, image_id: str) -> bool:
        """Remove an image (and its layers no other image shares); False if a container
        still uses it (the engine refuses, 409), True if it is gone, now or before."""
        try:
            await self.client.request("DELETE", f"/images/{quote_ref(image_id)}")
        except EngineError as exc:
            if _holds("remove_image", exc):
                return True
            if exc.status == 409:
                return False
            raise _meaning("remove_image", exc) from exc
        return True

    async def create_network(self, config: NetworkConfig) -> None:
        """Create a network (a leftover of the same name is removed first)."""
        await self.remove_network(config.name)
        try:
            await self.client.request("POST", "/networks/create", body=config)
        except EngineError as exc:
            raise _meaning("create_network", exc) from exc

    async def networks(self, label: str) -> list[NetworkSummary]:
        """Every network that carries ``label`` (``name`` or ``name=value``)."""
        filters = msgspec.json.encode({"label": [label]}).decode()
        return await self._get("networks", "/networks", list[NetworkSummary], {"filters": filters})

    async def remove_network(self, name: str) -> bool:
        """Remove a network; True if it is gone (now or before), False (and logged) if the
        engine refused (a container is still on it)."""
        try:
            await self.client.request("DELETE", f"/networks/{quote_ref(name)}")
        except EngineError as exc:
            if _holds("remove_network", exc):
                return True
            _log.warning("could not remove network %s: %s", name, exc)
            return False
        return True

    async def remove(self, container_id: str) -> bool:
        """Force-remove a container and its anonymous volumes, retrying while the runtime
        tears it down; False (and logged) if it is still there."""
        for attempt in range(_REMOVE_ATTEMPTS):
            try:
                await self.client.request(
                    "DELETE", f"/containers/{container_id}", params={"force": 1, "v": 1}
                )
            except EngineError as exc:
                if _holds("remove", exc):
                    return True
                if attempt == _REMOVE_ATTEMPTS - 1:
                    _log.warning("could not remove container %s: %s", container_id, exc)
                    return False
                await asyncio.sleep(_REMOVE_BACKOFF_S * (attempt + 1))
            else:
                return True
        return False

    async def _get(
        self, operation: str, path: str, shape: type[_T], params: dict[str, Any] | None = None
    ) -> _T:
        try:
            response = await self.client.request("GET", path, params=params)
        except EngineError as exc:
            raise _meaning(operation, exc) from exc
        return _decode(operation, response, shape)


# What a failed pull's message says, in the words of the engine and of distribution's
# registry client: the first pattern found gives the code.
_PULL_CODES = (
    ("digest_mismatch", ("digest did not match", "manifest verification failed", "invalid digest")),
    (
        "registry_auth_failed",
        ("unauthorized", "authentication required", "denied", "no basic auth"),
    ),
    # A status as a word of its own: the message names the registry's URL, whose port may
    # hold the digits (127.0.0.1:40412 stalling is a timeout, not a missing image).
    ("image_not_found", ("manifest unknown", "not found", "does not exist", " 404 ")),
    ("disk_full", ("no space left",)),
    ("pull_timeout", ("deadline exceeded", "client.timeout", "timed out", "tls handshake timeout")),
    (
        "registry_unreachable",
        ("connection refused", "no such host", "i/o timeout", "certificate", "tls:", "dial tcp"),
    ),
)


def _pull_code(detail: str, status: int | None = None) -> str:
    """The code of a failed pull, by the engine's message (then its status)."""
    lowered = f" {detail.lower()} "
    for code, patterns in _PULL_CODES:
        if any(pattern in lowered for pattern in patterns):
            return code
    return {404: "image_not_found", 401: "registry_auth_failed"}.get(status or 0, "pull_failed")


def _holds(operation: str, exc: EngineError) -> bool:
    """Whether the engine's refusal of ``operation`` means that the state the caller
    wants holds already."""
    return (operation, exc.status) in _DONE


def _meaning(operation: str, exc: EngineError) -> SandboxError:
    """The error that the engine's refusal (or failure) of ``operation`` is to us."""
    if operation == "start":  # whatever failed, the job did not start
        return RunError("start_failed", exc.detail)
    code = _CODES.get((operation, exc.status or 0), exc.code)
    return EngineError(code, exc.detail, status=exc.status)


def _decode(operation: str, response: Response, shape: type[_T]) -> _T:
    """The answer as ``shape``; an answer of another shape is the engine failing us."""
    try:
        return msgspec.json.decode(response.body, type=shape)
    except msgspec.DecodeError as exc:
        raise EngineError("engine_error", f"{operation}: unexpected answer: {exc}") from exc
