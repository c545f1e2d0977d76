"""The control socket's file and its peers: who may connect, and a socket that is never
reachable with the wrong permissions.

Who may connect: root, the daemon's own uid, and members of the socket's group (its
primary or a supplementary group), as the kernel reports them for the connecting process
(``SO_PEERCRED``, ``SO_PEERGROUPS``).

The socket is bound under a temporary name, given its mode and group, and renamed into
place. A lock file beside it tells a daemon still running from a stale socket left by one
that died.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Final

import msgspec

from agent.errors import ControlError

__all__ = [
    "PeerCredentials",
    "bind_control_socket",
    "peer_allowed",
    "read_peer_credentials",
    "socket_path_fault",
]

# Linux <asm-generic/socket.h>; Python names SO_PEERCRED but not this one.
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
_NGROUPS_MAX: Final = 65536
_SUN_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) less its terminating NUL


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


def bind_control_socket(path: Path, mode: int, group: str | None) -> tuple[socket.socket, int]:
    """A listening socket at ``path`` with ``mode`` and ``group``, and the lock file's
    descriptor, held until closed. Raises ``ControlError``: socket_in_use, unknown_group,
    bad_socket_path, socket_error."""
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
    staging = _staging(path)
    if fault := socket_path_fault(path):
        raise ControlError("bad_socket_path", fault)
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


def socket_path_fault(path: Path) -> str:
    """Why no unix socket can be bound at ``path`` ("" if one can): its address, and that
    of the temporary name it is bound under first, must fit in ``sun_path``."""
    if len(os.fsencode(_staging(path))) > _SUN_PATH_MAX:
        return f"{path}: too long for a unix socket (at most ~100 bytes)"
    return ""


def _staging(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}")


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
