"""Quota and retention of the coordinator's store: what keeps a node's messages bounded.

Mixed into :class:`coordinator.store.Store`, on its connection and in its transactions.
Each node's stored bytes are counted in ``nodes.stored_bytes`` as messages come and go;
its last seq is kept in ``nodes.agent_seq``, apart from the rows, so deleting any of them
never moves the node's ``welcome`` back.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from typing import Any

__all__ = ["Retention"]


class Retention:
    """The quota half of :class:`coordinator.store.Store` (which provides the stubs below)."""

    _db: sqlite3.Connection
    #: All nodes' stored bytes, so that the store-wide cap costs no scan of ``nodes`` per
    #: message; None: not known (at start, or after a rollback), read again when needed.
    _total_bytes: int | None = None

    def _transaction(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _total_stored(self) -> int:
        """All nodes' stored bytes together."""
        if self._total_bytes is None:
            (total,) = self._db.execute(
                "SELECT COALESCE(SUM(stored_bytes), 0) FROM nodes"
            ).fetchone()
            self._total_bytes = int(total)
        return self._total_bytes

    def _count_bytes(self, node_id: str, delta: int) -> None:
        """Add ``delta`` to the node's stored bytes (and to the total)."""
        self._db.execute(
            "UPDATE nodes SET stored_bytes = stored_bytes + ? WHERE node_id = ?", (delta, node_id)
        )
        if self._total_bytes is not None:
            self._total_bytes += delta

    def _quota(
        self,
        node_id: str,
        quota: int,
        unverified_quota: int,
        profile: dict[str, Any] | None,
        unverified: object,
    ) -> int:
        """The node's quota (0: none): the smaller one until it has a verified profile."""
        if not unverified_quota or (profile is not None and unverified is None):
            return quota  # a message that verifies the node is held to its full quota
        verified = self._db.execute(
            "SELECT 1 FROM profiles WHERE node_id = ?", (node_id,)
        ).fetchone()
        if verified is not None:
            return quota
        return min(quota, unverified_quota) if quota else unverified_quota

    def _evict_telemetry(self, node_id: str, need: int, least: int) -> int:
        """Delete a node's oldest telemetry, ``need`` bytes or all it has; nothing when it
        has less than ``least`` (deleting would not make room). Returns the bytes freed
        (already taken off its count)."""
        (held,) = self._db.execute(
            "SELECT COALESCE(SUM(length(CAST(body AS BLOB))), 0) FROM messages"
            " WHERE node_id = ? AND type = 'telemetry'",
            (node_id,),
        ).fetchone()
        if held < least:
            return 0
        freed, upto = 0, 0
        while freed < need:
            rows = self._db.execute(
                "SELECT seq, length(CAST(body AS BLOB)) FROM messages"
                " WHERE node_id = ? AND type = 'telemetry' AND seq > ? ORDER BY seq LIMIT 256",
                (node_id, upto),
            ).fetchall()
            if not rows:
                break
            for seq, size in rows:
                freed, upto = freed + int(size), int(seq)
                if freed >= need:
                    break
        if upto:
            self._db.execute(
                "DELETE FROM messages WHERE node_id = ? AND type = 'telemetry' AND seq <= ?",
                (node_id, upto),
            )
            self._count_bytes(node_id, -freed)
        return freed

    def prune_telemetry(self, received_before: float, keep_rows: int) -> int:
        """Delete telemetry received before ``received_before`` or beyond the newest
        ``keep_rows`` of its node; returns how many rows went.

        A node's last seq is kept in ``nodes``, so that its ``welcome`` never goes back.
        """
        deleted = 0
        for (node_id,) in self._db.execute("SELECT node_id FROM nodes").fetchall():
            with self._transaction():
                row = self._db.execute(
                    "SELECT seq FROM messages WHERE node_id = ? AND type = 'telemetry'"
                    " ORDER BY seq DESC LIMIT 1 OFFSET ?",
                    (node_id, keep_rows),
                ).fetchone()
                where = (
                    " FROM messages WHERE node_id = ? AND type = 'telemetry'"
                    " AND (received < ? OR seq <= ?)"
                )
                args = (node_id, received_before, 0 if row is None else row[0])
                count, size = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(length(CAST(body AS BLOB))), 0)" + where, args
                ).fetchone()
                if count:
                    self._db.execute("DELETE" + where, args)
                    self._count_bytes(node_id, -int(size))
                deleted += int(count)
        return deleted

    def stored_bytes(self, node_id: str) -> int:
        """The bytes of message bodies stored for a node (what its quota counts)."""
        row = self._db.execute(
            "SELECT stored_bytes FROM nodes WHERE node_id = ?", (node_id,)
        ).fetchone()
        return 0 if row is None else int(row[0])
