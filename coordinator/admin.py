"""The admin listener: a small HTTP/1.1 server on loopback for the API's POSTs.

Why a second listener: the websocket port's HTTP parser (``websockets.http11.Request``)
refuses any request with a body, since a websocket handshake has none, so ``POST`` with
JSON cannot reach :mod:`coordinator.api` there. This listener binds 127.0.0.1 only and
serves the same routes, GET and POST; it reads one request per connection (with
``Content-Length``; no chunked bodies, no keep-alive) and answers with ``Connection: close``.

The mutating routes need a bearer token. The coordinator draws a fresh one at each start
and writes it with the listener's URL to :data:`ADMIN_FILE` in its state directory (mode
0600, beside its key): whoever can read that file may submit jobs, nobody else.

The same server, given a ``stream`` handler, a host and TLS, is the artifact listener
(:mod:`coordinator.artifacts`): a ``PUT``'s body is then not read here but handed on as
the stream it is, for the handler to copy to disk under its own caps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import ssl
import stat
import urllib.parse
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import msgspec

from agent.protocol.limits import MAX_FRAME_BYTES
from coordinator.api_util import HttpAnswer, HttpRequest, error
from coordinator.errors import AdminError

__all__ = [
    "ADMIN_FILE",
    "AdminFile",
    "AdminListener",
    "check_url",
    "new_token",
    "read_admin_file",
    "write_admin_file",
]

ADMIN_FILE = "admin.json"
#: Largest request body: a job offer must fit in one frame, so its spec does too.
MAX_BODY_BYTES = MAX_FRAME_BYTES
_MAX_HEADERS = 100
_READ_TIMEOUT_S = 10.0
_MAX_ADMIN_FILE_BYTES = 4096


# What new_token() makes; a token outside it would not fit in a header line unchanged.
_Token = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,256}(?!\n)$")]


class AdminFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What ``admin.json`` holds: where the admin API is, and its token."""

    url: Annotated[str, msgspec.Meta(max_length=2048)]
    token: _Token


def check_url(url: str) -> str:
    """``url`` if it can be the admin API's base URL: ``http(s)://host[:port][/path]``.

    Raises:
        AdminError: ``bad_url``, saying what is wrong.
    """
    # Control characters, spaces and non-ASCII would reach the request line (http.client
    # refuses them only when sending, with exceptions of its own); credentials and a query
    # have no place in a base URL that paths are appended to.
    if not (url.isascii() and url.isprintable()) or " " in url:
        raise AdminError("bad_url", f"{url!r}: a URL is printable ASCII without spaces")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError when not a number in 0..65535
    except ValueError as exc:
        raise AdminError("bad_url", f"{url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AdminError("bad_url", f"{url!r}: not an http:// or https:// URL of a host")
    if parts.username is not None or parts.query or parts.fragment or port == 0:
        raise AdminError("bad_url", f"{url!r}: a base URL has no credentials, query or port 0")
    return url


def new_token() -> str:
    """A fresh admin token: 32 random bytes, URL-safe base64."""
    return secrets.token_urlsafe(32)


def write_admin_file(state_dir: Path, admin: AdminFile) -> Path:
    """Write ``admin.json`` (mode 0600) atomically into ``state_dir``; returns its path."""
    path = state_dir / ADMIN_FILE
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, msgspec.json.encode(admin) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise AdminError("admin_file_unwritable", f"cannot write {path}: {exc}") from None
    return path


def read_admin_file(path: Path) -> AdminFile:
    """The admin URL and token a running coordinator wrote.

    Raises:
        AdminError: ``admin_file_missing`` (no coordinator ran with that state directory,
            or it is not readable), ``admin_file_unsafe`` (not a regular file, or open to
            group or others: the token may be known), ``admin_file_corrupt`` (not the JSON
            of an :class:`AdminFile`, or its URL is not one, see :func:`check_url`).
    """
    # O_NONBLOCK: a FIFO put there would block the open for ever.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise AdminError(
            "admin_file_missing",
            f"{path}: {exc.strerror}; is the coordinator running with this --state-dir?",
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdminError("admin_file_unsafe", f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise AdminError(
                "admin_file_unsafe",
                f"{path} is open to group or others (mode {stat.S_IMODE(st.st_mode):04o})",
            )
        data = os.read(fd, _MAX_ADMIN_FILE_BYTES + 1)
    except OSError as exc:
        raise AdminError("admin_file_missing", f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        admin = msgspec.json.decode(data, type=AdminFile)
        check_url(admin.url)
    except (msgspec.DecodeError, AdminError) as exc:
        raise AdminError("admin_file_corrupt", f"{path}: {exc}") from None
    return admin


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


Handler = Callable[[HttpRequest], Awaitable[HttpAnswer]]
#: Answers a PUT whose body it reads itself (``Content-Length`` bytes from the stream).
StreamHandler = Callable[[HttpRequest, asyncio.StreamReader], Awaitable[HttpAnswer]]


class AdminListener:
    """The HTTP listener (loopback unless told); ``handler`` answers each request, and
    ``stream``, if given, each PUT."""

    def __init__(
        self,
        handler: Handler,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
        stream: StreamHandler | None = None,
    ) -> None:
        self._handler = handler
        self._stream = stream
        self._host = host
        self._ssl = ssl_context
        self._requested_port = port
        self._server: asyncio.Server | None = None
        self._requests: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        if self._server is None:
            raise RuntimeError("the admin listener is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """The base URL of the admin API."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on 127.0.0.1."""
        self._server = await asyncio.start_server(
            self._serve, self._host, self._requested_port, ssl=self._ssl
        )

    async def stop(self) -> None:
        """Stop listening; cancel the requests under way, which answer nobody."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in self._requests:
            task.cancel()
        await asyncio.gather(*self._requests, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._requests.add(task)
        try:
            try:
                streamed = False
                async with asyncio.timeout(_READ_TIMEOUT_S):
                    request = await _read_head(reader, writer)
                    streamed = self._stream is not None and request.method == "PUT"
                    if not streamed:
                        request = await _read_body(request, reader)
                if self._stream is not None and streamed:
                    answer = await self._stream(request, reader)
                else:
                    answer = await self._handler(request)
            except _BadRequest as exc:
                answer = error(exc.status, exc.detail)
            except TimeoutError:
                answer = error(HTTPStatus.REQUEST_TIMEOUT, "the request was not read in time")
            writer.write(_serialize(answer))
            await writer.drain()
            if answer.file is not None:
                await _send_file(writer, *answer.file)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: nobody to answer
        finally:
            self._requests.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _read_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> HttpRequest:
    """One request's line and headers (its body not read)."""
    try:
        line = await reader.readuntil(b"\r\n")
        parts = line.decode("ascii").rstrip("\r\n").split(" ")
    except (asyncio.LimitOverrunError, UnicodeDecodeError):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "not an HTTP/1.1 request line") from None
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "not an HTTP/1.1 request line")
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS + 1):
        try:
            raw = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "a header line is too long") from None
        if raw == b"\r\n":
            break
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "a header line without a colon")
        headers[name.strip().lower()] = value.strip()
    else:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, f"more than {_MAX_HEADERS} headers")
    if "transfer-encoding" in headers:
        raise _BadRequest(HTTPStatus.LENGTH_REQUIRED, "send the body with Content-Length")
    content_length(headers)
    peer = writer.get_extra_info("peername")
    return HttpRequest(
        method=parts[0],
        target=parts[1],
        headers=headers,
        body=b"",
        peer=str(peer[0]) if isinstance(peer, tuple) else "",
    )


def content_length(headers: dict[str, str]) -> int:
    """The request's ``Content-Length`` (0 when absent).

    Raises:
        _BadRequest: not a plain non-negative decimal number.
    """
    text = headers.get("content-length", "0")
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "Content-Length is not a number")
    return int(text)


async def _read_body(request: HttpRequest, reader: asyncio.StreamReader) -> HttpRequest:
    """The request with its body of ``Content-Length`` bytes, at most MAX_BODY_BYTES."""
    length = content_length(request.headers)
    if length > MAX_BODY_BYTES:
        raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"limit {MAX_BODY_BYTES} bytes")
    return msgspec.structs.replace(request, body=await reader.readexactly(length))


async def _send_file(writer: asyncio.StreamWriter, path: str, size: int) -> None:
    """Stream ``size`` bytes of ``path`` (an answer's file) to the client, read in a
    worker thread a chunk at a time."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # removed by retention since it was found: the client sees a short body
    try:
        sent = 0
        while sent < size:
            chunk = await asyncio.to_thread(os.pread, fd, min(1 << 20, size - sent), sent)
            if not chunk:
                break  # shorter than recorded: the client sees a short body, not garbage
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
    finally:
        os.close(fd)


def _serialize(answer: HttpAnswer) -> bytes:
    length = answer.file[1] if answer.file is not None else len(answer.body)
    head = [
        f"HTTP/1.1 {answer.status.value} {answer.status.phrase}",
        f"Content-Type: {answer.content_type}",
        f"Content-Length: {length}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    head += [f"{name}: {value}" for name, value in answer.headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + answer.body
