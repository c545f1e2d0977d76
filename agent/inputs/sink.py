"""Where a fetched body goes: preallocated buffers, hashed and written off the event loop.

The receive path fills a :class:`Sink`'s current buffer in place (``recv_into`` its
:meth:`~Sink.space`); a full buffer goes to two worker threads at once, one that hashes
and one that writes to the file, each in order, and comes back once both are done with
it. hashlib and ``os.write`` release the GIL, so receiving, hashing and writing overlap
(hashing then writing in one thread was what held the agent back: sha256 alone is about
as slow as receiving and writing), and no object is allocated per chunk received (a
fresh ``bytes`` per read costs its page faults every time).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from agent.errors import InputError

__all__ = ["Sink"]

#: Buffers per sink, and their size: the receive path runs up to three ahead of the disk
#: (one is the one being filled, one a spare for what was read before a pause). 4 MiB
#: buffers take about half the CPU per GiB of 1 MiB ones (fewer pauses, larger reads).
BUFFERS: Final = 5
BUFFER_BYTES: Final = 4 << 20


class Sink:
    """A body's bytes, hashed (sha256) and written to ``fd`` in the order received.

    ``wake`` is called on the event loop each time the workers are done with a buffer
    (room again, or :attr:`error` set)."""

    def __init__(self, fd: int, wake: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = wake
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="input-hash")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="input-write")
        # Its own descriptor, closed by the writer after the last write: a fetch
        # cancelled mid-write must not leave a thread writing to a number the caller
        # closed and something else may have opened since.
        self._fd = os.dup(fd)
        self._current = bytearray(BUFFER_BYTES)
        self._filled = 0
        self._free = deque(bytearray(BUFFER_BYTES) for _ in range(BUFFERS - 1))
        self._in_flight: dict[int, int] = {}  # id of a buffer out -> workers not done
        self._idle: asyncio.Future[None] | None = None
        self._abandoned = False
        self.digest = hashlib.sha256()
        self.error: BaseException | None = None
        """What writing failed with (``disk_full``, ...); nothing is written after it."""

    @property
    def full(self) -> bool:
        """Whether the workers have all buffers but the spare: receive no more until woken."""
        return len(self._free) < 2

    def space(self) -> memoryview:
        """The free part of the current buffer (never empty)."""
        return memoryview(self._current)[self._filled :]

    def filled(self, count: int) -> bool:
        """Take ``count`` bytes written into :meth:`space`; True if that filled a buffer,
        which went to the workers."""
        self._filled += count
        if self._filled < len(self._current):
            return False
        buffer, self._current, self._filled = self._current, self._free.popleft(), 0
        self._submit(buffer, len(buffer))
        return True

    def add(self, data: bytes) -> bool:
        """Copy ``data`` in (a decoded chunk); True if that filled a buffer. Less than a
        buffer's worth may still be added once :attr:`full`: that is what the spare is for."""
        view, handed = memoryview(data), False
        while view:
            space = self.space()
            count = min(len(space), len(view))
            space[:count] = view[:count]
            view = view[count:]
            handed = self.filled(count) or handed
        return handed

    async def finish(self) -> str:
        """Hash and write what is left; the sha256 of everything, once it is all written."""
        if self._filled:
            self._submit(self._current, self._filled)
            self._filled = 0
        if self._in_flight:
            self._idle = self._loop.create_future()
            await self._idle
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()

    def close(self) -> None:
        """Stop: what is still queued is dropped, and the descriptor closed after it."""
        self._abandoned = True
        self._writer.submit(os.close, self._fd)
        self._hasher.shutdown(wait=False)
        self._writer.shutdown(wait=False)

    def _submit(self, buffer: bytearray, count: int) -> None:
        self._in_flight[id(buffer)] = 2
        self._hasher.submit(self._hash, buffer, count)
        self._writer.submit(self._write, buffer, count)

    def _hash(self, buffer: bytearray, count: int) -> None:
        """In the hashing thread: hash one buffer."""
        if not self._abandoned:
            with memoryview(buffer)[:count] as view:
                self.digest.update(view)
        self._hand_back(buffer, None)

    def _write(self, buffer: bytearray, count: int) -> None:
        """In the writing thread: write one buffer."""
        error: BaseException | None = None
        if not self._abandoned:
            with memoryview(buffer)[:count] as view:
                try:
                    _write_all(self._fd, view)
                except (InputError, OSError) as exc:
                    error = exc
                    self._abandoned = True
        self._hand_back(buffer, error)

    def _hand_back(self, buffer: bytearray, error: BaseException | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._consumed, buffer, error)
        except RuntimeError:  # the loop is closed: the fetch was abandoned, nobody waits
            return

    def _consumed(self, buffer: bytearray, error: BaseException | None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self._in_flight[id(buffer)] -= 1
        if self._in_flight[id(buffer)]:
            return  # the other worker still has it
        del self._in_flight[id(buffer)]
        self._free.append(buffer)
        if not self._in_flight and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        self._wake()


def _write_all(fd: int, data: memoryview) -> None:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InputError("disk_full", f"writing the input: {exc.strerror}") from None
        raise
