"""Collecting a job's output files from its output directory, safely.

The directory was writable by the job: anything in it may be a trap. A symlink named
``result`` pointing at ``/etc/shadow`` must not make the agent read a host file, so every
path component is opened with ``O_NOFOLLOW`` relative to the directory above it, and only
regular files are read.

Given a ``keep`` directory, each file is copied there as it is hashed (``keep/<index>``,
its index in ``paths``), from the same reads: what is kept is exactly what was hashed, and
it outlives the job directory (the agent uploads it later from there).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from sandbox.events import OutputFile

__all__ = ["collect_outputs"]

_CHUNK = 1 << 20


def collect_outputs(
    output_dir: Path, paths: Iterable[str], max_bytes: int, keep: Path | None = None
) -> list[OutputFile]:
    """Digest each requested output path; together they may not exceed ``max_bytes``.
    With ``keep``, an existing directory, each regular file is also copied to
    ``keep/<index>``."""
    budget = max_bytes
    collected = []
    for index, path in enumerate(paths):
        copy = None if keep is None else keep / str(index)
        item = _collect(output_dir, path, budget, copy)
        budget -= item.size_bytes if item.status == "ok" else 0
        collected.append(item)
    return collected


def _collect(output_dir: Path, path: str, budget: int, copy: Path | None) -> OutputFile:
    parts = PurePosixPath(path).parts
    try:
        fd = _open_beneath(output_dir, parts)
    except FileNotFoundError:
        return OutputFile(path=path, status="missing")
    except OSError:  # a symlink (ELOOP), a file where a directory should be (ENOTDIR)...
        return OutputFile(path=path, status="not_a_file")
    try:
        return _digest(fd, path, budget, copy)
    finally:
        os.close(fd)


def _digest(fd: int, path: str, budget: int, copy: Path | None) -> OutputFile:
    info = os.fstat(fd)
    # A directory, a FIFO or a device opens too: only a regular file is read.
    if not stat.S_ISREG(info.st_mode):
        return OutputFile(path=path, status="not_a_file")
    if info.st_size > budget:
        return OutputFile(path=path, status="too_large", size_bytes=info.st_size)
    out = None
    if copy is not None:
        out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        digest = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, min(_CHUNK, budget - size + 1)):
            size += len(chunk)
            if size > budget:  # it grew after the fstat
                return OutputFile(path=path, status="too_large", size_bytes=size)
            digest.update(chunk)
            if out is not None:
                _write_all(out, chunk)
    finally:
        if out is not None:
            os.close(out)
    return OutputFile(path=path, status="ok", size_bytes=size, sha256=digest.hexdigest())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _open_beneath(root: Path, parts: tuple[str, ...]) -> int:
    """Open ``root/parts...`` for reading without following a symlink anywhere on the way."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for index, part in enumerate(parts):
            if part in ("", ".", "..", "/"):
                raise FileNotFoundError(part)
            last = index == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | (0 if last else os.O_DIRECTORY)
            # O_NONBLOCK: a FIFO planted by the job must not hang the agent on open.
            next_fd = os.open(part, flags | os.O_NONBLOCK, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return fd
    except BaseException:
        os.close(fd)
        raise
