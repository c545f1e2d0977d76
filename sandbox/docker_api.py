"""The wire to the Docker engine: its HTTP API over a unix socket, asynchronously.

The lower half of the one engine boundary: HTTP/1.1 requests, the API version to speak,
the hijacked stream of an attach and an armed wait. It knows no endpoint's meaning;
:mod:`sandbox.engine` (the typed client the runner uses) does. An answer other than 2xx
raises :class:`EngineError` ``engine_error`` with its ``status``, which the engine maps.

A small client on asyncio streams rather than the Docker SDK: the runner needs a handful
of endpoints, a container's output read at its own pace, and no thread per call. Each
request opens its own connection (``Connection: close``); a unix socket connects in
microseconds.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, urlencode

import msgspec

from sandbox.engine_types import VersionInfo
from sandbox.errors import EngineError

__all__ = ["DEFAULT_SOCKET", "Attachment", "DockerClient", "Response", "quote_ref"]

DEFAULT_SOCKET = "/var/run/docker.sock"
# The newest API this client speaks; an older engine is spoken to at its own version.
_API_MAX = (1, 44)
_API_MIN = (1, 41)  # Docker 20.10, as in Debian 12
_HEADER_LIMIT = 64 * 1024
_STREAM_NAMES = {1: "stdout", 2: "stderr"}
_READ_BYTES = 1 << 16
# What a broken or hostile answer raises while we parse it: all mean "the engine failed".
_BROKEN_ANSWER = (
    ConnectionError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    ValueError,
    OSError,
)


class Response:
    """A complete HTTP response: status, lower-cased headers, body."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        """The body decoded as JSON; an answer that is not JSON is an engine error."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError as exc:
            raise EngineError("engine_error", f"the engine's answer is not JSON: {exc}") from exc


class DockerClient:
    """Docker Engine API over a unix socket."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, *, timeout_s: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._prefix: str | None = None
        self.api_version: tuple[int, int] = _API_MIN

    async def version(self) -> VersionInfo:
        """The engine's version; also fixes the API version to speak."""
        response = _checked(await self._send("GET", "/version"))
        try:
            info = msgspec.json.decode(response.body, type=VersionInfo)
            server = tuple(int(part) for part in info.api_version.split("."))
        except (msgspec.DecodeError, ValueError) as exc:
            raise EngineError("engine_error", f"the engine's version is unreadable: {exc}") from exc
        if len(server) < 2:
            raise EngineError("engine_error", f"Docker API version {info.api_version!r}")
        if server < _API_MIN:
            raise EngineError("engine_too_old", f"Docker API {info.api_version} < 1.41")
        self.api_version = min((server[0], server[1]), _API_MAX)
        self._prefix = f"/v{self.api_version[0]}.{self.api_version[1]}"
        return info

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout_s: float | None = None,
    ) -> Response:
        """One API call; non-2xx answers raise :class:`EngineError`."""
        if self._prefix is None:
            await self.version()
        return _checked(
            await self._send(method, self._path(path, params), body, timeout_s or self.timeout_s)
        )

    @asynccontextmanager
    async def attach(self, container_id: str) -> AsyncIterator[Attachment]:
        """Attach to a (non-TTY) container's stdout and stderr, as ``docker run`` does.

        Attached before the start, nothing the container writes is missed; the engine
        copies the output to this socket only, not to a log driver. The connection is
        read only as fast as the caller iterates :meth:`Attachment.frames`, and a full
        socket holds back the container's writes.
        """
        if self._prefix is None:
            await self.version()
        params = {"stream": 1, "stdout": 1, "stderr": 1}
        path = self._path(f"/containers/{container_id}/attach", params)
        reader, writer = await self._connect()
        try:
            # The upgrade headers ask for the hijacked raw stream ("101 UPGRADED").
            upgrade = {"Connection": "Upgrade", "Upgrade": "tcp"}
            writer.write(_request_bytes("POST", path, None, upgrade))
            await writer.drain()
            status, headers = await asyncio.wait_for(_read_head(reader), self.timeout_s)
            if status >= 300:
                raise _error(Response(status, headers, await _read_body(reader, headers)))
        except (TimeoutError, *_BROKEN_ANSWER) as exc:
            writer.close()
            raise EngineError("engine_error", f"attach {container_id}: {exc!r}") from exc
        except BaseException:
            writer.close()
            raise
        try:
            yield Attachment(reader)
        finally:
            writer.close()

    async def stream_lines(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        idle_timeout_s: float,
        max_line_bytes: int = _HEADER_LIMIT,
    ) -> AsyncGenerator[bytes, None]:
        """One API call whose answer is a stream of JSON lines (an image pull's progress),
        yielded line by line as the engine writes them.

        Raises:
            EngineError: a non-2xx answer (with its status), a broken stream,
                ``engine_error`` for a line over ``max_line_bytes``, and ``stream_stalled``
                when no byte came for ``idle_timeout_s``.
        """
        if self._prefix is None:
            await self.version()
        reader, writer = await self._connect()
        try:
            writer.write(_request_bytes(method, self._path(path, params), None, headers))
            await writer.drain()
            status, head = await asyncio.wait_for(_read_head(reader), self.timeout_s)
            if status >= 300:
                raise _error(Response(status, head, await _read_body(reader, head)))
            pending = b""
            chunks = _iter_body(reader, head).__aiter__()
            while True:
                try:
                    async with asyncio.timeout(idle_timeout_s):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    detail = f"{method} {path}: nothing for {idle_timeout_s:g} s"
                    raise EngineError("stream_stalled", detail) from exc
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > max_line_bytes:
                    raise EngineError("engine_error", f"{method} {path}: a line over the cap")
                for line in lines:
                    if line.strip():
                        yield line
            if pending.strip():
                yield pending
        except _BROKEN_ANSWER as exc:
            raise EngineError("engine_error", f"{method} {path}: {exc!r}") from exc
        finally:
            writer.close()

    def _path(self, path: str, params: Mapping[str, Any] | None) -> str:
        query = f"?{urlencode(params)}" if params else ""
        return f"{self._prefix}{path}{query}"

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(self.socket_path, limit=_HEADER_LIMIT)
        except PermissionError as exc:
            raise EngineError(
                "engine_unreachable", f"no permission to open {self.socket_path}"
            ) from exc
        except OSError as exc:
            raise EngineError(
                "engine_unreachable", f"no Docker engine at {self.socket_path}: {exc.strerror}"
            ) from exc

    async def _send(
        self, method: str, path: str, body: Any = None, timeout_s: float | None = None
    ) -> Response:
        async def exchange() -> Response:
            reader, writer = await self._connect()
            try:
                writer.write(_request_bytes(method, path, body))
                await writer.drain()
                status, headers = await _read_head(reader)
                return Response(status, headers, await _read_body(reader, headers))
            finally:
                writer.close()

        try:
            return await asyncio.wait_for(exchange(), timeout_s or self.timeout_s)
        except TimeoutError as exc:
            raise EngineError("engine_error", f"{method} {path}: no answer in time") from exc
        except _BROKEN_ANSWER as exc:
            raise EngineError("engine_error", f"{method} {path}: {exc!r}") from exc

    async def wait_armed(self, container_id: str) -> Callable[[], Coroutine[Any, Any, Response]]:
        """Register a wait for the container's next exit; return the call that collects it.

        The engine answers the headers only once the wait is registered, so an exit that
        comes right after (even before ``start`` returns) is not missed.
        """
        if self._prefix is None:
            await self.version()
        path = self._path(f"/containers/{container_id}/wait", {"condition": "next-exit"})
        reader, writer = await self._connect()
        try:
            writer.write(_request_bytes("POST", path, None))
            await writer.drain()
            status, headers = await asyncio.wait_for(_read_head(reader), self.timeout_s)
        except BaseException as exc:
            writer.close()
            if isinstance(exc, TimeoutError | _BROKEN_ANSWER):
                raise EngineError("engine_error", f"wait {container_id}: {exc!r}") from exc
            raise

        async def collect() -> Response:
            try:
                return _checked(Response(status, headers, await _read_body(reader, headers)))
            except _BROKEN_ANSWER as exc:
                raise EngineError("engine_error", f"wait {container_id}: {exc!r}") from exc
            finally:
                writer.close()

        return collect


class Attachment:
    """The output of an attached container, read on demand."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    async def frames(self) -> AsyncGenerator[tuple[str, bytes], None]:
        """The output as ``(stream name, bytes)`` frames, until the container's streams close."""
        pending = bytearray()
        try:
            while chunk := await self._reader.read(_READ_BYTES):
                pending += chunk
                # Multiplexed stream: 8-byte header (stream id, 3 zero bytes, size).
                offset = 0
                while len(pending) - offset >= 8:
                    stream_id, size = struct.unpack_from(">BxxxL", pending, offset)
                    end = offset + 8 + size
                    if end > len(pending):
                        break
                    if stream_id in _STREAM_NAMES:  # 1 stdout, 2 stderr; nothing else is output
                        yield _STREAM_NAMES[stream_id], bytes(pending[offset + 8 : end])
                    offset = end
                del pending[:offset]
        except _BROKEN_ANSWER as exc:
            raise EngineError("engine_error", f"attached stream: {exc!r}") from exc


def quote_ref(reference: str) -> str:
    """An image reference or container name made safe for a URL path."""
    return quote(reference, safe="")


def _request_bytes(
    method: str, path: str, body: Any, extra: Mapping[str, str] | None = None
) -> bytes:
    # A dict or a Struct of sandbox.engine_types alike.
    payload = b"" if body is None else msgspec.json.encode(body)
    fields = {"Host": "docker", "Connection": "close", **(extra or {})}
    head = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in fields.items())]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    elif method in ("POST", "PUT"):
        head.append("Content-Length: 0")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise EngineError("engine_error", f"not an HTTP answer: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _iter_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining:
            chunk = await reader.read(min(remaining, 1 << 16))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(chunk)
            yield chunk
    else:
        while chunk := await reader.read(1 << 16):
            yield chunk


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    return b"".join([chunk async for chunk in _iter_body(reader, headers)])


def _checked(response: Response) -> Response:
    if response.status >= 300:
        raise _error(response)
    return response


class _Refusal(msgspec.Struct, frozen=True):
    """The body of an engine's error answer."""

    message: str = ""


def _error(response: Response) -> EngineError:
    """A refusal as an error that carries its status; :mod:`sandbox.engine` gives it
    its meaning (and code) for the operation that was refused."""
    try:
        message = msgspec.json.decode(response.body, type=_Refusal).message
    except msgspec.DecodeError:
        message = response.body[:200].decode(errors="replace")
    detail = f"Docker answered {response.status}: {message}"
    return EngineError("engine_error", detail, status=response.status)
