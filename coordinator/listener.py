"""Several coordinators on one PostgreSQL database: what each hears of the others.

Each coordinator holds the sessions of the nodes connected to it. The store tells every
one, through PostgreSQL's LISTEN/NOTIFY on one dedicated connection each:

- :data:`~coordinator.stream_store.OUTBOUND` ``<node id>``, at the commit of each message
  stored in a node's stream (a job offered through another coordinator): the one holding
  the node's session sends it (:meth:`Session.catch_up`);
- :data:`~coordinator.stream_store.SESSION` ``<coordinator> <session> <node id>``, as a
  session opens: one holding an older session of the node closes it (``superseded``).

It also says, every :data:`~coordinator.presence_store.HEARTBEAT_S`, that its coordinator
is alive (:mod:`coordinator.presence_store`).

Notifications arrive in the order their transactions committed. So a coordinator that
hears of another's session of a node it holds knows which is newer: its own, if it has
not heard of its own yet (the other will close its session on hearing of this one).
A notification sent while the listening connection was down is lost: on reconnecting,
every session here catches up with the store, and an older session a lost notification
should have closed ends with its connection (the agent has a newer one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol

import psycopg

from coordinator.db import driver_errors
from coordinator.presence_store import HEARTBEAT_S
from coordinator.stream_store import OUTBOUND, SESSION

__all__ = ["ListenedSession", "ListenedSessions", "Listener"]

_log = logging.getLogger(__name__)

#: Seconds before the listening connection is made again after it broke.
RETRY_S = 1.0


class ListenedSession(Protocol):
    """What the listener needs of one session (:class:`coordinator.connection._Session`)."""

    token: str
    announced: bool

    async def catch_up(self) -> None: ...

    def supersede(self) -> None: ...

    async def close_superseded(self) -> None: ...


class ListenedSessions(Protocol):
    """The open sessions of this coordinator, by node id."""

    def get(self, node_id: str) -> ListenedSession | None: ...

    def __iter__(self) -> Iterator[str]: ...


class Listener:
    """One connection LISTENing on the store's channels, run as a task on the loop."""

    def __init__(
        self,
        url: str,
        coordinator_id: str,
        sessions: ListenedSessions,
        *,
        alive: Callable[[], None],
    ) -> None:
        """``alive``: say that this coordinator is alive (called now, then every
        :data:`HEARTBEAT_S`)."""
        self._alive = alive
        self._url = url
        self._id = coordinator_id
        self._sessions = sessions
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._work: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen (raises the driver's error if the server cannot be reached now)."""
        self._alive()
        self._conn = await self._connect()
        self._task = asyncio.create_task(self._run())
        self._spawn(self._beat())

    async def stop(self) -> None:
        """Stop listening, and what was started on hearing something."""
        for task in (self._task, *self._work):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._task, *self._work) if t), return_exceptions=True)
        self._task = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True)
        try:
            await conn.execute(f"LISTEN {OUTBOUND}")
            await conn.execute(f"LISTEN {SESSION}")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _run(self) -> None:
        while True:
            assert self._conn is not None
            try:
                async for note in self._conn.notifies():
                    self._heard(note.channel, note.payload)
            except psycopg.Error as exc:
                _log.warning("listener: connection lost (%s); again in %gs", exc, RETRY_S)
            await self._conn.close()
            self._conn = None
            while self._conn is None:
                await asyncio.sleep(RETRY_S)
                try:
                    self._conn = await self._connect()
                except psycopg.Error as exc:
                    _log.warning("listener: cannot reconnect (%s); again in %gs", exc, RETRY_S)
            # What was stored meanwhile was heard by nobody here.
            for node_id in list(self._sessions):
                if (session := self._sessions.get(node_id)) is not None:
                    self._spawn(session.catch_up())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                self._alive()
            except driver_errors() as exc:  # the store is down: so is everything else
                _log.warning("listener: heartbeat not stored: %s", exc)

    def _heard(self, channel: str, payload: str) -> None:
        """Carry out one notification."""
        if channel == OUTBOUND:
            session = self._sessions.get(payload)
            if session is not None:
                self._spawn(session.catch_up())
            return
        coordinator, _, rest = payload.partition(" ")
        token, _, node_id = rest.partition(" ")
        session = self._sessions.get(node_id)
        if session is None:
            return
        if coordinator == self._id:
            if session.token == token:
                session.announced = True
        elif session.announced:  # the other session opened after this one: it is newer
            session.supersede()
            self._spawn(session.close_superseded())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._work.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._work.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("listener: %s", exc, exc_info=exc)
