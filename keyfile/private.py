"""Reading and creating a private key's file, as OpenSSH treats its host keys.

A key file is refused if it is a symbolic link, not a regular file, owned by another user
(unless the caller allows it: root reading a service's key), or open to group or others:
such a key may be known, or swapped, by someone else. The checks run on the opened
descriptor, so the name cannot be swapped between check and read; ``O_NONBLOCK`` keeps a
FIFO from blocking the open, and no more than ``limit`` bytes are read.

A new key is born 0600 under ``O_EXCL`` in a temporary name and linked into place when
complete: a crash never leaves a half-written key, no file someone else prepared is
reused, and when two processes race, the first key linked is the one both read back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from keyfile.errors import KeyFileError

__all__ = [
    "MAX_KEY_BYTES",
    "check_private_dir",
    "create_private",
    "fsync_directory",
    "read_private",
]

#: A PEM Ed25519 key is 119 bytes; anything far larger is not one.
MAX_KEY_BYTES = 16 * 1024


def read_private(path: Path, *, any_owner: bool = False, fix: str = "") -> bytes | None:
    """The key file's bytes after its checks, or None when there is none.

    ``fix`` ends the ``key_permissions`` detail of a file open to group or others (what
    to do if the key may have leaked).

    Raises:
        KeyFileError: ``key_permissions``, ``key_unreadable``, ``key_corrupt`` (over
            :data:`MAX_KEY_BYTES`).
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError("key_permissions", f"{path} is a symbolic link") from None
        raise KeyFileError("key_unreadable", f"{path}: {exc.strerror}") from None
    try:
        _check_file(path, os.fstat(fd), any_owner=any_owner, fix=fix)
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_KEY_BYTES:
                raise KeyFileError("key_corrupt", f"{path} is over {MAX_KEY_BYTES} bytes")
    except OSError as exc:
        raise KeyFileError("key_unreadable", f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def create_private(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` atomically, mode 0600, unless a file appeared there
    meanwhile (then that one stands: read it back).

    Raises:
        KeyFileError: ``key_unwritable``.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        # FileExistsError: another process created the key first; its key is the one.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
        fsync_directory(path.parent)
    except OSError as exc:
        raise KeyFileError("key_unwritable", f"cannot create {path}: {exc}") from None
    finally:
        temporary.unlink(missing_ok=True)


def check_private_dir(path: Path, *, any_owner: bool = False) -> None:
    """Refuse a key's directory that others may write: whoever may write it may delete
    the key and have a new one made.

    Raises:
        KeyFileError: ``key_permissions``; ``OSError`` from stat passes through.
    """
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError("key_permissions", f"{path} is not a directory")
    if st.st_uid != os.geteuid() and not any_owner:
        raise KeyFileError("key_permissions", f"{path} is owned by uid {st.st_uid}")
    if st.st_mode & 0o022:
        raise KeyFileError(
            "key_permissions", f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; chmod 700 it"
        )


def fsync_directory(path: Path) -> None:
    """Make a new name in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_file(path: Path, st: os.stat_result, *, any_owner: bool, fix: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError("key_permissions", f"{path} is not a regular file")
    if st.st_uid != os.geteuid() and not any_owner:
        raise KeyFileError(
            "key_permissions", f"{path} is owned by uid {st.st_uid}, not {os.geteuid()}"
        )
    if st.st_mode & 0o077:
        raise KeyFileError(
            "key_permissions",
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, open to group or others"
            + (f"; {fix}" if fix else ""),
        )
