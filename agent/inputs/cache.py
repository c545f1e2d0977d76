"""The content-addressed cache of fetched inputs: one file per sha256, shared by jobs.

``root/sha256/<hex>`` is a whole, checked file (mode 0444): it is written as
``root/tmp/<hex>.<random>``, synced, and renamed in only once its digest matched, so a
killed agent leaves at most a temp file, which the next :meth:`InputCache.open` removes.
The cache has a byte budget: to fit a new entry, the least recently used entries that no
job holds are removed; what cannot fit even then is ``input_cache_full``. Two jobs asking
for one digest at once fetch it once (a lock per digest).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from agent.errors import InputError

__all__ = ["Fill", "InputCache"]

_log = logging.getLogger(__name__)
_HEX64 = re.compile(r"[0-9a-f]{64}")

#: Writes the whole checked input into an open file descriptor, or raises InputError.
Fill = Callable[[int], Awaitable[None]]


class InputCache:
    """Fetched inputs by digest under ``root``, within ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._entries: dict[str, int] = {}  # hex -> size, least recently used first
        self._users: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiting: dict[str, int] = {}
        self._reserved = 0

    @property
    def used_bytes(self) -> int:
        """What the entries hold, plus what fetches under way have reserved."""
        return sum(self._entries.values()) + self._reserved

    def open(self) -> None:
        """Make the directories, drop what a killed fetch left, and index the entries
        (least recently used first, by modification time)."""
        for sub in ("sha256", "tmp"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in (self.root / "tmp").iterdir():
            _log.info("removing an unfinished fetch: %s", leftover.name)
            leftover.unlink()
        found = []
        for path in (self.root / "sha256").iterdir():
            info = path.lstat()
            if not _HEX64.fullmatch(path.name) or not stat.S_ISREG(info.st_mode):
                _log.warning("not a cache entry, removed: %s", path)
                if stat.S_ISDIR(info.st_mode):
                    shutil.rmtree(path)
                else:
                    path.unlink()
                continue
            found.append((info.st_mtime_ns, path.name, info.st_size))
        self._entries = {name: size for _, name, size in sorted(found)}

    def path_of(self, sha256: str) -> Path:
        """Where the entry for ``sha256`` is (or would be)."""
        return self.root / "sha256" / sha256

    def holds(self, sha256: str) -> bool:
        """Whether a whole, checked entry for ``sha256`` is there."""
        return sha256 in self._entries

    @asynccontextmanager
    async def use(self, sha256: str, size_bytes: int, fill: Fill) -> AsyncIterator[Path]:
        """The entry for ``sha256``, fetched with ``fill`` unless there; it is not evicted
        until the block ends."""
        if not _HEX64.fullmatch(sha256):
            raise ValueError(f"{sha256!r} is not 64 lower-case hex digits")
        lock = self._locks.setdefault(sha256, asyncio.Lock())
        self._waiting[sha256] = self._waiting.get(sha256, 0) + 1
        try:
            async with lock:
                if sha256 not in self._entries:
                    await self._fetch(sha256, size_bytes, fill)
                self._users[sha256] = self._users.get(sha256, 0) + 1
        finally:
            self._waiting[sha256] -= 1
            if not self._waiting[sha256]:
                del self._waiting[sha256], self._locks[sha256]
        self._touch(sha256)
        try:
            yield self.path_of(sha256)
        finally:
            self._users[sha256] -= 1
            if not self._users[sha256]:
                del self._users[sha256]
            self._touch(sha256)

    async def _fetch(self, sha256: str, size_bytes: int, fill: Fill) -> None:
        self._make_room(size_bytes)
        self._reserved += size_bytes
        temp = self.root / "tmp" / f"{sha256}.{secrets.token_hex(4)}"
        try:
            self._check_disk(size_bytes)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                await fill(fd)
                os.fchmod(fd, 0o444)
                os.fsync(fd)  # the data is on disk before the name says it is whole
            finally:
                os.close(fd)
            os.rename(temp, self.path_of(sha256))
            _fsync_dir(self.root / "sha256")
            self._entries[sha256] = size_bytes
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InputError("disk_full", f"caching the input: {exc.strerror}") from None
            raise InputError("input_cache_error", f"caching the input: {exc}") from None
        finally:
            self._reserved -= size_bytes
            temp.unlink(missing_ok=True)

    def _make_room(self, size_bytes: int) -> None:
        """Evict unused entries, least recently used first, until ``size_bytes`` fits."""
        if size_bytes > self.max_bytes:
            raise InputError(
                "input_cache_full", f"{size_bytes} bytes, over the cache's {self.max_bytes}"
            )
        for victim in [name for name in self._entries if name not in self._users]:
            if self.used_bytes + size_bytes <= self.max_bytes:
                break
            _log.info("evicting input %s (%d bytes)", victim, self._entries[victim])
            self.path_of(victim).unlink(missing_ok=True)
            del self._entries[victim]
        if self.used_bytes + size_bytes > self.max_bytes:
            raise InputError(
                "input_cache_full",
                f"{size_bytes} bytes do not fit: {self.used_bytes} of {self.max_bytes} "
                "are held by running jobs or fetches",
            )

    def _check_disk(self, size_bytes: int) -> None:
        info = os.statvfs(self.root / "tmp")
        free = info.f_bavail * info.f_frsize
        if free < size_bytes:
            raise InputError("disk_full", f"{size_bytes} bytes to cache, {free} free on disk")

    def _touch(self, sha256: str) -> None:
        """Make ``sha256`` the most recently used, here and on disk (for the next start)."""
        size = self._entries.pop(sha256)
        self._entries[sha256] = size
        try:
            os.utime(self.path_of(sha256))
        except OSError as exc:
            _log.warning("cannot mark input %s used: %s", sha256, exc.strerror)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
