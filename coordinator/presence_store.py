"""Which coordinator holds each node's session, when several share one database.

Each coordinator on PostgreSQL records the sessions it opens and closes
(``node_sessions``), the nodes' data connections it holds (``node_tunnels``: where the
gateway of another coordinator sends a request for their services, to the ``peer_url``
the holder gives), and says it is alive every :data:`HEARTBEAT_S` (``coordinators``); a
node counts as connected while a coordinator alive within :data:`ALIVE_S` holds its
session, so the sessions of one killed -9 stop counting on their own. One coordinator at a
time leads (a session-level advisory lock on its connection, released with it): the
deployments' reconciler runs there, over every coordinator's nodes. On SQLite the one
coordinator holds every session itself and always leads; nothing is recorded.
"""

from __future__ import annotations

from typing import Final

from coordinator.db import Database

__all__ = ["ALIVE_S", "FORGET_S", "HEARTBEAT_S", "SCHEMA", "Presence"]

#: Seconds between a coordinator's heartbeats.
HEARTBEAT_S: Final = 5.0
#: A coordinator not heard of for this long holds no session any more.
ALIVE_S: Final = 3 * HEARTBEAT_S
#: A coordinator not heard of for this long is forgotten (by the lead's retention pass).
FORGET_S: Final = 86400.0
#: The advisory lock of the leading coordinator.
_LEAD_LOCK: Final = 0x67_70_75_2D_6C_65_61_64  # "gpu-lead"

#: Schema version 8 (:mod:`coordinator.store`); 9 adds ``peer_url`` and ``node_tunnels``.
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS coordinators (
    coordinator_id TEXT PRIMARY KEY,
    alive REAL NOT NULL,
    peer_url TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE TABLE IF NOT EXISTS node_tunnels (
    node_id TEXT PRIMARY KEY,
    coordinator_id TEXT NOT NULL,
    opened REAL NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS node_sessions (
    node_id TEXT PRIMARY KEY,
    coordinator_id TEXT NOT NULL,
    token TEXT NOT NULL,
    opened REAL NOT NULL
) STRICT;
"""


class Presence:
    """The ``coordinators`` and ``node_sessions`` tables, and the lead."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def alive(self, coordinator_id: str, now: float, peer_url: str = "") -> None:
        """Say that ``coordinator_id`` is alive at ``now``, its gateway reachable by the
        others at ``peer_url`` (empty: it takes no request of theirs)."""
        self._db.execute(
            "INSERT INTO coordinators (coordinator_id, alive, peer_url) VALUES (?, ?, ?)"
            " ON CONFLICT (coordinator_id) DO UPDATE SET alive = excluded.alive,"
            " peer_url = excluded.peer_url",
            (coordinator_id, now, peer_url),
        )

    def tunnel_opened(self, node_id: str, coordinator_id: str, now: float) -> None:
        """Record that ``coordinator_id`` holds the node's data connection now."""
        self._db.execute(
            "INSERT INTO node_tunnels (node_id, coordinator_id, opened) VALUES (?, ?, ?)"
            " ON CONFLICT (node_id) DO UPDATE SET"
            " coordinator_id = excluded.coordinator_id, opened = excluded.opened",
            (node_id, coordinator_id, now),
        )

    def tunnel_closed(self, node_id: str, coordinator_id: str) -> None:
        """Forget the node's data connection on ``coordinator_id`` (unless it is elsewhere now)."""
        self._db.execute(
            "DELETE FROM node_tunnels WHERE node_id = ? AND coordinator_id = ?",
            (node_id, coordinator_id),
        )

    def peer_tunnels(self, coordinator_id: str, now: float) -> dict[str, str]:
        """The nodes whose data connection another coordinator alive now holds, and the
        ``peer_url`` of that coordinator's gateway (those that gave one)."""
        rows = self._db.execute(
            "SELECT t.node_id, c.peer_url FROM node_tunnels t JOIN coordinators c"
            " ON c.coordinator_id = t.coordinator_id"
            " WHERE c.alive >= ? AND c.coordinator_id <> ? AND c.peer_url <> ''",
            (now - ALIVE_S, coordinator_id),
        ).fetchall()
        return {str(node): str(url) for node, url in rows}

    def opened(self, node_id: str, coordinator_id: str, token: str, now: float) -> None:
        """Record that ``coordinator_id`` holds the node's session ``token`` now."""
        self._db.execute(
            "INSERT INTO node_sessions (node_id, coordinator_id, token, opened)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
            " coordinator_id = excluded.coordinator_id, token = excluded.token,"
            " opened = excluded.opened",
            (node_id, coordinator_id, token, now),
        )

    def closed(self, node_id: str, token: str) -> None:
        """Forget the node's session ``token`` (unless a newer one took its place)."""
        self._db.execute(
            "DELETE FROM node_sessions WHERE node_id = ? AND token = ?", (node_id, token)
        )

    def connected(self, now: float) -> set[str]:
        """The nodes whose session a coordinator alive now holds."""
        rows = self._db.execute(
            "SELECT s.node_id FROM node_sessions s JOIN coordinators c"
            " ON c.coordinator_id = s.coordinator_id WHERE c.alive >= ?",
            (now - ALIVE_S,),
        ).fetchall()
        return {str(r[0]) for r in rows}

    def forget_dead(self, before: float) -> int:
        """Forget the coordinators not alive since ``before``, and the sessions they held
        (each start of a coordinator is a new one); returns how many coordinators went."""
        with self._db.transaction():
            for table in ("node_sessions", "node_tunnels"):
                self._db.execute(
                    f"DELETE FROM {table} WHERE coordinator_id IN"
                    " (SELECT coordinator_id FROM coordinators WHERE alive < ?)",
                    (before,),
                )
            return self._db.execute("DELETE FROM coordinators WHERE alive < ?", (before,)).rowcount

    def lead(self) -> bool:
        """Whether this connection's coordinator leads (taking the lead if it is free)."""
        if self._db.dialect == "sqlite":
            return True
        # Asked each time, not remembered: a connection made again lost the lock. The
        # connection takes no other advisory lock outside a transaction.
        (held,) = self._db.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
            " AND pid = pg_backend_pid() AND granted)"
        ).fetchone()
        if not held:
            (held,) = self._db.execute("SELECT pg_try_advisory_lock(?)", (_LEAD_LOCK,)).fetchone()
        return bool(held)
