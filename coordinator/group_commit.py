"""Group commit: the agents' messages stored many to a transaction, on a writer thread.

A ``synchronous=FULL`` commit is an fsync: one per message on the event loop made the loop
wait for the disk a thousand times a second at 10,000 agents (issue 14). Here the messages
of every session go to one writer thread with its own connection to the store's file. It
takes what is queued (and what arrives within :data:`WINDOW_S` of the first), stores each
message as :meth:`Store.add` does, and commits them together: one fsync for the group. Each
session awaits its own message's outcome, which is set only once the group's commit has
returned, so an ack can never precede the durability of what it acknowledges; a session
handles its frames one at a time, so a node's messages are stored in its seq order.

A reconnecting node's handshake writes here too (its last-seen time, its ``attest_request``
and nonce), so that 10,000 reconnecting nodes never have the loop wait for the write lock.
The loop's connection still writes the rest (a new node's first row, job offers and
reports); the database serialises the two writers (SQLite: one at a time, WAL: readers
never wait; PostgreSQL: a node's row is locked while its message is stored). On SQLite the
writer's commits also checkpoint the WAL (and the writer, idle, now and then): the loop's
connection never does.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from coordinator.db import DbTarget
from coordinator.retention import Quotas
from coordinator.store import Added, Message, Store

__all__ = ["IDLE_CHECKPOINT_S", "WINDOW_S", "GroupCommit"]

_log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long the writer waits for more messages after the first of a group: a few ms of
#: latency for far fewer fsyncs under load. Messages queued during a commit need no wait.
WINDOW_S = 0.002
#: A writer with nothing to write for this long copies the WAL into the file: the loop's
#: connection never does, and with no agent sending, its commits would grow the WAL for good.
IDLE_CHECKPOINT_S = 5.0
#: The most messages in one transaction: a group of 56 KB batches holds the write lock
#: while it is written, and the loop's own writes (handshakes) wait for it meanwhile.
MAX_GROUP = 64


@dataclass(slots=True)
class _Pending:
    call: Callable[[Store], Any]
    future: asyncio.Future[Any] | None
    """None: nobody waits (:meth:`GroupCommit.submit`)."""
    loop: asyncio.AbstractEventLoop


class GroupCommit:
    """The writer thread and its queue; :meth:`add` from the event loop."""

    def __init__(
        self,
        target: DbTarget,
        quotas: Quotas,
        *,
        window_s: float = WINDOW_S,
        idle_checkpoint_s: float = IDLE_CHECKPOINT_S,
    ) -> None:
        """Open the writer's own connection to the store at ``target`` (opened already)."""
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._window_s = window_s
        self._idle_checkpoint_s = idle_checkpoint_s
        self._opened = threading.Event()
        self._error: BaseException | None = None
        self.groups = 0
        """Transactions committed: with :attr:`messages`, how well calls are grouped."""
        self.messages = 0
        """Calls committed."""
        self._thread = threading.Thread(
            target=self._run, args=(target, quotas), name="store-writer", daemon=True
        )
        self._thread.start()
        self._opened.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    async def add(self, message: Message) -> Added:
        """Store ``message`` (as :meth:`Store.add`); return once its group has committed.

        Raises:
            ValueError, a driver error (:func:`coordinator.db.driver_errors`): as
                :meth:`Store.add`; nothing of it was stored.
        """
        return await self.call(lambda store: store.add_in_transaction(message))

    async def call(self, call: Callable[[Store], T]) -> T:
        """Run ``call`` on the writer's store in the next group; its result once committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Pending(call, future, loop))
        return await future

    def submit(self, call: Callable[[Store], object]) -> None:
        """Run ``call`` in the next group, waiting for nothing (what may be lost on a crash:
        a node's last-seen time). A failure is logged."""
        self._queue.put(_Pending(call, None, asyncio.get_running_loop()))

    def close(self) -> None:
        """Store what is queued, then stop the thread and close its connection."""
        self._queue.put(None)
        self._thread.join()

    def _run(self, target: DbTarget, quotas: Quotas) -> None:
        try:
            # Opened here: a connection belongs to the thread that made it.
            store = Store(target, quotas)
        except BaseException as exc:
            self._error = exc
            self._opened.set()
            return
        self._opened.set()
        try:
            while (group := self._next_group(store)) is not None:
                self._commit(store, group)
                if group and group[-1] is None:
                    break
        finally:
            store.close()

    def _next_group(self, store: Store) -> list[_Pending | None] | None:
        """The next group: what is queued, waiting up to the window for more; None: stop.
        Idle meanwhile, it checkpoints the WAL now and then."""
        while True:
            try:
                first = self._queue.get(timeout=self._idle_checkpoint_s)
                break
            except queue.Empty:
                store.checkpoint()
        if first is None:
            return None
        group: list[_Pending | None] = [first]
        deadline = time.monotonic() + self._window_s
        while len(group) < MAX_GROUP:
            try:
                pending = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            group.append(pending)
            if pending is None:  # close(): store these, then stop
                break
        return group

    def _commit(self, store: Store, group: list[_Pending | None]) -> None:
        pendings = [p for p in group if p is not None]
        try:
            results = store.run_group([p.call for p in pendings])
        except Exception as exc:  # the commit failed: none of the group is stored
            _log.exception("group commit of %d call(s) failed", len(pendings))
            results = [exc] * len(pendings)
        else:
            self.groups += 1
            self.messages += len(pendings)
        for p, result in zip(pendings, results, strict=True):
            if p.future is not None:
                p.loop.call_soon_threadsafe(_settle, p.future, result)
            elif isinstance(result, Exception):
                _log.error("a store write nobody waits for failed: %s", result)


def _settle(future: asyncio.Future[Any], result: object) -> None:
    """Give a session its call's outcome (unless it went away meanwhile)."""
    if future.done():  # cancelled: the session ended; the agent resends, a duplicate
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
