"""Serves the local control API on a unix socket; ``agent.control`` is the wire format.

Who may connect: root, the daemon's own uid, and members of the socket's group (its
primary or a supplementary group), as the kernel reports them for the connecting process
(``SO_PEERCRED``, ``SO_PEERGROUPS``). Everyone else is answered ``permission_denied`` and
closed. Read methods and the mutating ones (pause, resume) share that rule: the socket's
group is the trust boundary, the way the ``docker`` group is Docker's, and nothing behind it
is worth a second tier (pausing only stops this machine from taking new jobs).

The socket is bound under a temporary name, given its mode and group, and renamed into
place, so it is never reachable with other permissions. A lock file beside it tells a
daemon still running from a stale socket left by one that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Final

import msgspec

from agent.control import (
    MAX_REQUEST_BYTES,
    Call,
    ControlTarget,
    JobsParams,
    LineSplitter,
    LogsParams,
    PauseParams,
    Refusal,
    StatusView,
    encode_error,
    encode_event,
    encode_result,
    parse_request,
)
from agent.errors import ControlError

__all__ = ["ControlServer", "PeerCredentials", "peer_allowed", "read_peer_credentials"]

_log = logging.getLogger(__name__)
# Linux <asm-generic/socket.h>; Python names SO_PEERCRED but not this one.
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
_NGROUPS_MAX: Final = 65536
_SUN_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) less its terminating NUL
_READ_SIZE: Final = 64 * 1024


class PeerCredentials(msgspec.Struct, frozen=True):
    """Who is at the other end of a connection, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def peer_allowed(peer: PeerCredentials, *, daemon_uid: int, socket_gid: int) -> bool:
    """Whether ``peer`` may use the control socket."""
    if peer.uid in (0, daemon_uid):
        return True
    return peer.gid == socket_gid or socket_gid in peer.groups


def read_peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The connecting process's pid, uid, gid and supplementary groups."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return PeerCredentials(pid, uid, gid, _peer_groups(sock, pid))


def _peer_groups(sock: socket.socket, pid: int) -> tuple[int, ...]:
    for count in (256, _NGROUPS_MAX):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            if exc.errno != errno.ENOPROTOOPT:
                raise
            break
        return struct.unpack(f"{len(raw) // 4}I", raw)
    # Kernels before 4.13: the groups the process has now, which may differ from those
    # it had at connect time if it changed them since (only root can).
    return _proc_groups(Path("/proc") / str(pid) / "status")


def _proc_groups(status_file: Path) -> tuple[int, ...]:
    for line in status_file.read_text(encoding="ascii").splitlines():
        if line.startswith("Groups:"):
            return tuple(int(g) for g in line.split()[1:])
    return ()


class _Connection:
    """One client: answers and events share its writer, one line at a time."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.lock = asyncio.Lock()
        self.latest: StatusView | None = None
        self.changed = asyncio.Event()
        self.pusher: asyncio.Task[None] | None = None

    async def send(self, line: bytes) -> None:
        async with self.lock:
            self.writer.write(line)
            await self.writer.drain()

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
    """

    def __init__(
        self,
        target: ControlTarget,
        path: Path,
        *,
        mode: int = 0o660,
        group: str | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        if not 0 <= mode <= 0o777:
            raise ValueError(f"mode {mode:o} is not a permission mode")
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
        sock, self._lock_fd = _bind(self.path, self.mode, self.group)
        info = os.stat(self.path)
        self._inode, self._gid = info.st_ino, info.st_gid
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

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
        conversation = asyncio.create_task(self._converse(reader, writer))
        self._conversations.add(conversation)
        try:
            await asyncio.wait([conversation])
        finally:
            self._conversations.discard(conversation)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(writer)
        try:
            if await self._admit(connection):
                await self._read_requests(reader, connection)
        except ConnectionError:
            _log.debug("control client went away mid-answer")
        finally:
            self._subscribers.discard(connection)
            if connection.pusher is not None:
                connection.pusher.cancel()
            try:
                writer.close()
                await writer.wait_closed()
            except ConnectionError:
                pass
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
        while True:
            data = await reader.read(_READ_SIZE)
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
            result = await target.pause(params.drain)
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
        except ConnectionError:
            # The reader sees the same end of the connection and cleans up.
            _log.debug("control subscriber went away")


# ---------------------------------------------------------------------- the socket


def _bind(path: Path, mode: int, group: str | None) -> tuple[socket.socket, int]:
    """A listening socket at ``path`` with ``mode`` and ``group``, and the held lock."""
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ControlError(
                "unknown_group",
                f"the control socket's group {group!r} does not exist",
                fix=f"create it: sudo groupadd --system {group}",
            ) from None
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    if len(os.fsencode(staging)) > _SUN_PATH_MAX:
        raise ControlError(
            "bad_socket_path", f"{path}: too long for a unix socket (at most ~100 bytes)"
        )
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ControlError("socket_error", f"{path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(path) from None
        _remove_stale(path)
        return _listen(path, staging, mode, gid), lock_fd
    except BaseException:
        os.close(lock_fd)
        raise


def _listen(path: Path, staging: Path, mode: int, gid: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        staging.unlink(missing_ok=True)
        sock.bind(os.fsencode(staging))
        os.chmod(staging, mode)
        if gid >= 0:
            os.chown(staging, -1, gid)
        sock.listen(socket.SOMAXCONN)
        os.rename(staging, path)
    except OSError as exc:
        sock.close()
        staging.unlink(missing_ok=True)
        raise ControlError("socket_error", f"{path}: {exc.strerror}") from exc
    return sock


def _remove_stale(path: Path) -> None:
    """Remove a socket nobody answers on (its daemon died); refuse to touch a live one."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError("bad_socket_path", f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fsencode(path))
    except ConnectionRefusedError:
        path.unlink()
        return
    except TimeoutError:
        pass  # a listener with a full backlog: alive, just busy
    except OSError as exc:
        raise ControlError("socket_error", f"{path}: {exc.strerror}") from exc
    finally:
        probe.close()
    raise _in_use(path)


def _in_use(path: Path) -> ControlError:
    return ControlError(
        "socket_in_use",
        f"another gpu-agent answers on {path}",
        fix="stop it first (systemctl stop gpu-agent), or give this one another socket",
    )
