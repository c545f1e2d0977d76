"""Serves the local control API on a unix socket; ``agent.control.wire`` is the wire format.

Who may connect (``agent.control.socket_file``): root, the daemon's own uid, and members of
the socket's group; everyone else is answered ``permission_denied`` and closed. Read
methods and the mutating ones (pause, resume) share that rule: the socket's group is the
trust boundary, the way the ``docker`` group is Docker's, and nothing behind it is worth a
second tier (pausing only stops this machine from taking new jobs).

What one connection may hold is bounded: at most ``max_connections`` are served at once
(the next ones get one ``too_many_connections`` line), a connection that sends no request
for ``idle_timeout_s`` (unless it is subscribed) or leaves a request line unfinished for
``line_timeout_s`` gets one ``idle_timeout`` line and is closed, and so is one that reads
none of its answers for ``idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Final

from agent.control.socket_file import bind_control_socket, peer_allowed, read_peer_credentials
from agent.control.wire import (
    MAX_REQUEST_BYTES,
    Call,
    ControlTarget,
    JobsParams,
    LineSplitter,
    LogsParams,
    PauseParams,
    Refusal,
    SettingsParams,
    StatusView,
    encode_error,
    encode_event,
    encode_result,
    parse_request,
)
from agent.errors import ControlError

__all__ = ["ControlServer"]

_log = logging.getLogger(__name__)
#: How long, and how much, a refused peer is read before its connection is closed.
_LINGER_S = 1.0
_LINGER_BYTES = 1 << 20
_READ_SIZE: Final = 64 * 1024
#: Connections served at once; the tray holds two, each CLI command one.
MAX_CONNECTIONS: Final = 256
#: How long a connection may wait between requests (a subscribed one may wait forever),
#: and take to read an answer.
IDLE_TIMEOUT_S: Final = 300.0
#: How long a request line may take from its first byte to its newline.
LINE_TIMEOUT_S: Final = 10.0


class _Stalled(ConnectionError):
    """The peer read none of what it was sent for ``idle_timeout_s``."""


class _Connection:
    """One client: answers and events share its writer, one line at a time."""

    def __init__(self, writer: asyncio.StreamWriter, send_timeout_s: float) -> None:
        self.writer = writer
        self.send_timeout_s = send_timeout_s
        self.lock = asyncio.Lock()
        self.latest: StatusView | None = None
        self.changed = asyncio.Event()
        self.pusher: asyncio.Task[None] | None = None

    async def send(self, line: bytes) -> None:
        async with self.lock:
            self.writer.write(line)
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await self.writer.drain()
            except TimeoutError:
                raise _Stalled from None

    async def push_states(self) -> None:
        """Send the latest state whenever it changed: one slot, so a slow reader skips
        the states it had no time for and never holds the daemon back."""
        sent: StatusView | None = None
        while True:
            await self.changed.wait()
            self.changed.clear()
            status = self.latest
            if status is not None and status != sent:
                await self.send(encode_event("state", status))
                sent = status


class ControlServer:
    """The control API on a unix socket, answering from ``target``.

    Args:
        target: the daemon.
        path: where the socket goes (e.g. ``/run/gpu-agent/agent.sock``); its directory
            is created if missing.
        mode: the socket's permission bits; connecting takes write permission.
        group: the group to own the socket; it must exist. None: the daemon's group.
        max_request_bytes: the longest request line read.
        max_connections: connections served at once.
        idle_timeout_s: the longest wait for a request (unless subscribed), and for the
            peer to read an answer.
        line_timeout_s: the longest a request line may take from first byte to newline.
    """

    def __init__(
        self,
        target: ControlTarget,
        path: Path,
        *,
        mode: int = 0o660,
        group: str | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        line_timeout_s: float = LINE_TIMEOUT_S,
    ) -> None:
        if not 0 <= mode <= 0o777:
            raise ValueError(f"mode {mode:o} is not a permission mode")
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.line_timeout_s = line_timeout_s
        self._served = 0
        self.target = target
        self.path = path
        self.mode = mode
        self.group = group
        self.max_request_bytes = max_request_bytes
        self._server: asyncio.Server | None = None
        self._closing = False
        self._lock_fd = -1
        self._inode = 0
        self._gid = -1
        self._conversations: set[asyncio.Task[None]] = set()
        self._pushers: set[asyncio.Task[None]] = set()
        self._subscribers: set[_Connection] = set()

    async def start(self) -> None:
        """Bind the socket and start answering. Raises ``ControlError``: socket_in_use,
        unknown_group, bad_socket_path, socket_error."""
        sock, self._lock_fd = bind_control_socket(self.path, self.mode, self.group)
        info = os.stat(self.path)
        self._inode, self._gid = info.st_ino, info.st_gid
        # asyncio listens again on a socket it is given, with a backlog of 100 unless
        # told: a burst of clients past that would be refused by the kernel.
        self._server = await asyncio.start_unix_server(
            self._serve, sock=sock, backlog=socket.SOMAXCONN
        )

    @property
    def subscribed(self) -> bool:
        """Whether anyone follows the state stream; a new subscriber reads the state itself,
        so a daemon with none need not build one to publish."""
        return bool(self._subscribers)

    def publish(self, status: StatusView) -> None:
        """The daemon's state changed: every subscriber gets it (or a later one) soon."""
        for connection in self._subscribers:
            connection.latest = status
            connection.changed.set()

    async def close(self) -> None:
        """Stop answering, drop every connection, remove the socket."""
        if self._server is None:
            return
        self._closing = True
        self._server.close()
        conversations = list(self._conversations)
        for conversation in conversations:
            conversation.cancel()
        await asyncio.gather(*conversations, return_exceptions=True)
        await asyncio.gather(*self._pushers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        self._closing = False
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()
        os.close(self._lock_fd)
        self._lock_fd = -1

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio's task for this callback must not end cancelled (3.11 reports that as an
        # unhandled error), so the conversation runs in a task of ours that close() cancels.
        if self._closing or self._server is None:  # accepted as close() began
            writer.transport.abort()
            return
        busy = self._served >= self.max_connections
        if not busy:
            self._served += 1
        conversation = asyncio.create_task(self._converse(reader, writer, busy))
        self._conversations.add(conversation)
        try:
            await asyncio.wait([conversation])
        finally:
            self._conversations.discard(conversation)
            if not busy:
                self._served -= 1

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, busy: bool
    ) -> None:
        connection = _Connection(writer, self.idle_timeout_s)
        stalled = False
        try:
            if busy:
                message = f"the agent serves {self.max_connections} connections at once; retry"
                await connection.send(encode_error(None, "too_many_connections", message))
                await _linger(reader, writer)
            elif await self._admit(connection):
                await self._read_requests(reader, connection)
            else:
                await _linger(reader, writer)
        except _Stalled:
            _log.debug("control client read nothing for %s s; dropped", self.idle_timeout_s)
            stalled = True
        except ConnectionError:
            _log.debug("control client went away mid-answer")
        finally:
            self._subscribers.discard(connection)
            if connection.pusher is not None:
                connection.pusher.cancel()
            try:
                if not stalled:  # else what is left would never be flushed
                    writer.close()
                    with contextlib.suppress(ConnectionError):  # the peer left first
                        await writer.wait_closed()
            finally:
                # Cancelled while flushing to a peer that reads nothing: drop what is left.
                writer.transport.abort()

    async def _admit(self, connection: _Connection) -> bool:
        sock = connection.writer.get_extra_info("socket")
        try:
            peer = read_peer_credentials(sock)
        except OSError as exc:
            _log.warning("control socket: cannot read the peer's credentials: %s", exc)
            await connection.send(encode_error(None, "permission_denied", "unknown peer"))
            return False
        if peer_allowed(peer, daemon_uid=os.geteuid(), socket_gid=self._gid):
            return True
        _log.warning("control socket: refused uid %d (pid %d)", peer.uid, peer.pid)
        message = (
            f"uid {peer.uid} is not root, the agent's user (uid {os.geteuid()}) "
            f"or a member of the socket's group (gid {self._gid})"
        )
        await connection.send(encode_error(None, "permission_denied", message))
        return False

    async def _read_requests(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        splitter = LineSplitter(self.max_request_bytes)
        loop = asyncio.get_running_loop()
        line_deadline: float | None = None
        while True:
            # A line's deadline runs from its first byte: trickling it in does not help.
            if splitter.pending:
                line_deadline = line_deadline or loop.time() + self.line_timeout_s
                deadline: float | None = line_deadline
            else:
                line_deadline = None
                subscribed = connection in self._subscribers
                deadline = None if subscribed else loop.time() + self.idle_timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    data = await reader.read(_READ_SIZE)
            except TimeoutError:
                if splitter.pending:
                    message = f"a request line unfinished after {self.line_timeout_s} s"
                else:
                    message = f"no request in {self.idle_timeout_s} s"
                await connection.send(encode_error(None, "idle_timeout", message))
                return
            for line in splitter.feed(data) if data else splitter.close():
                await self._answer(connection, line)
            if not data:
                return

    async def _answer(self, connection: _Connection, line: bytes | None) -> None:
        if line is None:
            message = f"a request line is at most {self.max_request_bytes} bytes"
            await connection.send(encode_error(None, "line_too_long", message))
            return
        call = parse_request(line)
        if isinstance(call, Refusal):
            await connection.send(encode_error(call.id, call.code, call.message))
            return
        try:
            await self._call(connection, call)
        except ControlError as exc:
            await connection.send(encode_error(call.id, exc.code, exc.detail))
        except ConnectionError:
            raise
        except Exception:
            # The daemon's bug must not take the control socket down with it.
            _log.exception("control method %s failed", call.method)
            message = f"{call.method} failed; the agent's log says why"
            await connection.send(encode_error(call.id, "internal_error", message))

    async def _call(self, connection: _Connection, call: Call) -> None:
        target, params = self.target, call.params
        result: object
        if call.method == "status":
            result = target.status()
        elif call.method == "pause":
            assert isinstance(params, PauseParams)
            result = await target.pause(params.drain, params.until)
        elif call.method == "resume":
            result = await target.resume()
        elif call.method == "jobs":
            assert isinstance(params, JobsParams)
            result = target.jobs(params.limit)
        elif call.method == "logs":
            assert isinstance(params, LogsParams)
            chunks = target.logs(params.job_id, params.follow)
            try:
                async for chunk in chunks:
                    await connection.send(encode_event("log", chunk, call.id))
            finally:
                if isinstance(chunks, AsyncGenerator):
                    await chunks.aclose()
            result = target.job(params.job_id)
        elif call.method == "settings":
            result = target.settings()
        elif call.method == "set_settings":
            assert isinstance(params, SettingsParams)
            result = await target.set_settings(params.changes)
        else:
            assert call.method == "subscribe"
            await connection.send(encode_result(call.id, None))
            self._subscribe(connection)
            return
        await connection.send(encode_result(call.id, result))

    def _subscribe(self, connection: _Connection) -> None:
        connection.latest = self.target.status()
        connection.changed.set()
        self._subscribers.add(connection)
        if connection.pusher is None:
            connection.pusher = asyncio.create_task(self._push(connection))
            self._pushers.add(connection.pusher)
            connection.pusher.add_done_callback(self._pushers.discard)

    async def _push(self, connection: _Connection) -> None:
        try:
            await connection.push_states()
        except _Stalled:
            # A subscriber that reads nothing: drop it, and its reader then sees the end.
            _log.debug("control subscriber read nothing for %s s; dropped", self.idle_timeout_s)
            connection.writer.transport.abort()
        except ConnectionError:
            # The reader sees the same end of the connection and cleans up.
            _log.debug("control subscriber went away")


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After a refusal: say no more, and read what the peer already sent before closing.

    Closing a unix socket with unread data resets the connection, and the peer would see
    a reset instead of the refusal it was sent.
    """
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(_LINGER_S):
            left = _LINGER_BYTES
            while left > 0 and (data := await reader.read(_READ_SIZE)):
                left -= len(data)
