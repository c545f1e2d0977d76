"""Reading a file a user named: only a regular one, and only so much of it.

``--policy /dev/zero`` must not fill memory, and a FIFO must not hang the reader until a
writer comes: the file is opened without blocking, its type checked on the open
descriptor (so the name cannot be swapped between the check and the read), and at most
``limit`` bytes read. Every fault is an ``OSError`` whose ``strerror`` says what it is.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["read_regular"]


def read_regular(path: Path, limit: int, *, private: bool = False) -> bytes:
    """The bytes of the regular file ``path``, refusing one of more than ``limit`` bytes;
    with ``private``, also one that group or others may access (a secret's file).

    Raises:
        FileNotFoundError: there is no such file.
        OSError: it cannot be opened or read, is not a regular file (``EINVAL``), is open
            to others when ``private`` (``EACCES``), or is larger than ``limit`` (``EFBIG``).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if private and mode & 0o077:
            open_to = f"mode {stat.S_IMODE(mode):04o} is open to group or others; chmod 600 it"
            raise OSError(errno.EACCES, open_to, str(path))
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, min(1 << 16, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return b"".join(chunks)
