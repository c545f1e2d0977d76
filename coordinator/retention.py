"""Quota and retention of the coordinator's store: what keeps a node's messages bounded.

Each node's stored bytes are counted in ``nodes.stored_bytes`` as messages come and go;
its last seq is kept in ``nodes.agent_seq``, apart from the rows, so deleting any of them
never moves the node's ``welcome`` back.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Sequence

import msgspec

from coordinator.db import Database
from coordinator.nodes_store import STORED_SIZE

__all__ = ["Quotas", "Retention", "run_passes"]

_log = logging.getLogger(__name__)


class Quotas(msgspec.Struct, frozen=True, kw_only=True):
    """The bytes of message bodies the store keeps; 0: no limit."""

    node_bytes: int = 0
    """Per node."""
    unverified_node_bytes: int = 0
    """Per node while it has no verified profile."""
    store_bytes: int = 0
    """All nodes together."""


class Retention:
    """Each node's stored bytes within its quota, and telemetry pruned past its time."""

    def __init__(self, db: Database, quotas: Quotas) -> None:
        self._db = db
        self._quotas = quotas
        # All nodes' stored bytes, so that the store-wide cap costs no scan of ``nodes`` per
        # message; None: not known yet. Read again after a rollback, which may undo a count,
        # and after another connection (the group-commit writer, or the loop's) committed.
        self._total_bytes: int | None = None
        self._total_read_at = (db.rollbacks, 0)

    def make_room(self, node_id: str, size: int, *, stored: int, verified: bool) -> bool:
        """Whether a message of ``size`` bytes fits the node's quota and the store's cap,
        once its oldest telemetry is deleted (in the caller's transaction) to make room.

        Args:
            stored: the bytes the node's quota counts now (its locked row's).
            verified: the node has a verified profile, or the message brings one: it is
                held to its full quota, not to the unverified one.
        """
        quota = self._quota(verified=verified)
        over = stored + size - quota if quota else 0
        slack = quota // 8
        cap = self._quotas.store_bytes
        if cap:
            slack = min(slack, cap // 8) if slack else cap // 8
            over = max(over, self._total_stored() + size - cap)
        # Evict an eighth of the quota (or cap) more than needed, so that a node streaming
        # at its quota evicts now and then, not on every message.
        return over <= 0 or self._evict_telemetry(node_id, over + slack, over) >= over

    def _total_stored(self) -> int:
        """All nodes' stored bytes together."""
        version = (self._db.rollbacks, self._db.data_version())
        if self._total_bytes is None or self._total_read_at != version:
            (total,) = self._db.execute(
                "SELECT COALESCE(SUM(stored_bytes), 0) FROM nodes"
            ).fetchone()
            self._total_bytes, self._total_read_at = int(total), version
        return self._total_bytes

    def count_bytes(self, node_id: str, delta: int) -> None:
        """Add ``delta`` to the node's stored bytes (and to the total)."""
        self._db.execute(
            "UPDATE nodes SET stored_bytes = stored_bytes + ? WHERE node_id = ?", (delta, node_id)
        )
        self.counted(delta)

    def counted(self, delta: int) -> None:
        """``delta`` was added to a node's stored bytes (by the caller's statement): the
        total follows."""
        if self._total_bytes is not None:
            self._total_bytes += delta

    def _quota(self, *, verified: bool) -> int:
        """A node's quota (0: none): the smaller one until it has a verified profile."""
        quota, unverified_quota = self._quotas.node_bytes, self._quotas.unverified_node_bytes
        if not unverified_quota or verified:
            return quota
        return min(quota, unverified_quota) if quota else unverified_quota

    def _evict_telemetry(self, node_id: str, need: int, least: int) -> int:
        """Delete a node's oldest telemetry, ``need`` bytes or all it has; nothing when it
        has less than ``least`` (deleting would not make room). Returns the bytes freed
        (already taken off its count)."""
        (held,) = self._db.execute(
            f"SELECT COALESCE(SUM({STORED_SIZE}), 0) FROM messages"
            " WHERE node_id = ? AND type = 'telemetry'",
            (node_id,),
        ).fetchone()
        if held < least:
            return 0
        freed, upto = 0, 0
        while freed < need:
            rows = self._db.execute(
                f"SELECT seq, {STORED_SIZE} FROM messages"
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
            self.count_bytes(node_id, -freed)
        return freed

    def prune_telemetry(self, received_before: float, keep_rows: int) -> int:
        """Delete telemetry received before ``received_before`` or beyond the newest
        ``keep_rows`` of its node; returns how many rows went.

        A node's last seq is kept in ``nodes``, so that its ``welcome`` never goes back.
        """
        deleted = 0
        # Only the nodes with telemetry to delete take the write lock (a transaction each):
        # 10,000 empty transactions at start-up would make the loop wait on the group-commit
        # writer 10,000 times.
        for (node_id,) in self._db.execute(
            "SELECT n.node_id FROM nodes n WHERE EXISTS (SELECT 1 FROM messages m"
            " WHERE m.node_id = n.node_id AND m.type = 'telemetry' AND m.received < ?)"
            " OR EXISTS (SELECT 1 FROM messages m WHERE m.node_id = n.node_id"
            " AND m.type = 'telemetry' LIMIT 1 OFFSET ?)",
            (received_before, keep_rows),
        ).fetchall():
            with self._db.transaction():
                # The node's row first, as Store.add locks it: a count of its bytes and a
                # delete of its rows by another coordinator's writer wait for this one.
                self._db.execute(
                    "SELECT 1 FROM nodes WHERE node_id = ?" + self._db.for_update, (node_id,)
                )
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
                    f"SELECT COUNT(*), COALESCE(SUM({STORED_SIZE}), 0)" + where, args
                ).fetchone()
                if count:
                    self._db.execute("DELETE" + where, args)
                    self.count_bytes(node_id, -int(size))
                deleted += int(count)
        return deleted

    def stored_bytes(self, node_id: str) -> int:
        """The bytes of message bodies stored for a node (what its quota counts)."""
        row = self._db.execute(
            "SELECT stored_bytes FROM nodes WHERE node_id = ?", (node_id,)
        ).fetchone()
        return 0 if row is None else int(row[0])


async def run_passes(
    passes: Sequence[tuple[str, Callable[[], object]]], interval_s: float, done: asyncio.Event
) -> None:
    """Run each pass now, then every ``interval_s``, setting ``done`` after each round,
    until cancelled. A pass that fails is logged and tried again at the next round; the
    others run all the same (telemetry that cannot be pruned keeps no output forever)."""
    while True:
        for what, run in passes:
            try:
                done_now = run()
                if inspect.isawaitable(done_now):  # a pass on a thread of its own
                    await done_now
            except Exception:  # said, and tried again at the next interval
                # A task that dies says nothing: the store would grow without a word.
                _log.exception("retention: the pass failed (%s); next in %gs", what, interval_s)
        done.set()
        await asyncio.sleep(interval_s)
