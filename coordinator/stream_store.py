"""The coordinator's stream to its nodes in the store: attestation nonces and outbound.

What the coordinator sends a node stays in ``outbound`` until the node acknowledges it, so
that the stream's sender is rebuilt from the store after a reconnect or a restart.

The store numbers that stream: a message takes the node's next seq (``nodes.coordinator_seq``
+ 1, the node's row locked until the commit) as it is inserted, so that two coordinators on
one database never give two messages one seq. Whichever holds the node's session then sends
the rows it has not sent (:meth:`StreamTable.unsent`), told by :data:`OUTBOUND` (a PostgreSQL
NOTIFY at the commit) when the row was written by another.
"""

from __future__ import annotations

from typing import Any

import msgspec

from agent.protocol.errors import AuthError
from agent.protocol.messages import (
    AttestRequestBody,
    ImagePrefetchBody,
    JobCancelBody,
    JobOfferBody,
    ReliableBody,
    ServiceRenewBody,
)
from agent.protocol.reliable import ReliableSender
from coordinator.db import Database

__all__ = ["OUTBOUND", "SESSION", "Outbound", "StreamTable"]

#: The channel told the node id of each message stored in a node's stream.
OUTBOUND = "outbound"
#: The channel told ``<coordinator> <session> <node id>`` of each session opened.
SESSION = "session"

#: The body type of each kind of message the coordinator's stream keeps in the store.
_OUTBOUND_BODIES: dict[str, type[ReliableBody]] = {
    "attest_request": AttestRequestBody,
    "job_offer": JobOfferBody,
    "job_cancel": JobCancelBody,
    "image_prefetch": ImagePrefetchBody,
    "service_renew": ServiceRenewBody,
}


class Outbound(msgspec.Struct, frozen=True, kw_only=True):
    """The coordinator's stream to one node: acked seq and what is still unacknowledged."""

    acked: int
    pending: list[tuple[int, str, Any]]
    """``(seq, type, body)`` after ``acked``, in seq order."""


class StreamTable:
    """Attestation nonces, and each node's stream of messages from the coordinator."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # ------------------------------------------------------------------ attestation nonces

    def issue_nonce(self, node_id: str, nonce: str, now: float) -> None:
        """Remember a nonce sent to a node in ``attest_request``."""
        self._db.execute(
            "INSERT INTO attest_nonces (nonce, node_id, issued) VALUES (?, ?, ?)",
            (nonce, node_id, now),
        )

    def add_attest_request(self, node_id: str, nonce: str, now: float, body: Any) -> int:
        """Remember ``nonce`` and keep the ``attest_request`` carrying it, in one commit (one
        fsync per handshake, not two); returns its seq."""
        with self._db.transaction():
            return self.insert_attest_request(node_id, nonce, now, body)

    def insert_attest_request(self, node_id: str, nonce: str, now: float, body: Any) -> int:
        """:meth:`add_attest_request` in the caller's transaction (a group commit's).

        Raises:
            ValueError: no such node.
        """
        self.issue_nonce(node_id, nonce, now)
        return self.insert_outbound(node_id, "attest_request", body)

    def check_nonce(self, node_id: str, nonce: str, now: float, ttl_s: float) -> None:
        """Refuse a nonce not issued to this node, expired, or already answered.

        The caller decides what a refusal means: the coordinator keeps a profile whose
        signature holds but whose nonce does not, as unverified.

        Raises:
            AuthError: ``stale_nonce`` (not ours for this node, or older than ``ttl_s``),
                ``replayed_nonce`` (a profile already answered it).
        """
        row = self._db.execute(
            "SELECT issued, used FROM attest_nonces WHERE nonce = ? AND node_id = ?",
            (nonce, node_id),
        ).fetchone()
        if row is None:
            raise AuthError("stale_nonce", "not a nonce this coordinator issued to this node")
        if row[1] is not None:
            raise AuthError("replayed_nonce", "a profile already answered this nonce")
        if now - row[0] > ttl_s:
            raise AuthError("stale_nonce", f"issued {now - row[0]:.0f} s ago, limit {ttl_s:.0f}")

    def use_nonce(self, nonce: str, now: float) -> None:
        """Mark a nonce answered (in the caller's transaction, with the profile)."""
        self._db.execute(
            "UPDATE attest_nonces SET used = ? WHERE nonce = ? AND used IS NULL", (now, nonce)
        )

    def purge_nonces(self, before: float) -> None:
        """Forget nonces issued before ``before``: they can no longer be answered."""
        self._db.execute("DELETE FROM attest_nonces WHERE issued < ?", (before,))

    # ------------------------------------------------------------------ coordinator -> agent

    def outbound(self, node_id: str) -> Outbound:
        """The coordinator's stream to a node: its acked seq and what is unacknowledged."""
        # One statement, so one snapshot: read apart, an ack committed in between (by the
        # writer, or another coordinator) would show the old acked seq without its rows.
        rows = self._db.execute(
            "SELECT n.coordinator_acked, o.seq, o.type, o.body FROM nodes n"
            " LEFT JOIN outbound o ON o.node_id = n.node_id WHERE n.node_id = ? ORDER BY o.seq",
            (node_id,),
        ).fetchall()
        pending = [
            (int(seq), str(kind), msgspec.json.decode(body))
            for _, seq, kind, body in rows
            if seq is not None
        ]
        return Outbound(acked=int(rows[0][0]) if rows else 0, pending=pending)

    def add_outbound(self, node_id: str, kind: str, body: Any) -> int:
        """Keep a message of the coordinator's stream until the node acknowledges it;
        returns its seq."""
        with self._db.transaction():
            return self.insert_outbound(node_id, kind, body)

    def insert_outbound(self, node_id: str, kind: str, body: Any) -> int:
        """:meth:`add_outbound` in the caller's transaction (with what goes with it).

        Raises:
            ValueError: no such node.
        """
        row = self._db.execute(
            "SELECT coordinator_seq FROM nodes WHERE node_id = ?" + self._db.for_update,
            (node_id,),
        ).fetchone()
        if row is None:
            raise ValueError(f"no node {node_id!r}")
        seq = int(row[0]) + 1
        self._db.execute(
            "INSERT INTO outbound (node_id, seq, type, body) VALUES (?, ?, ?, ?)",
            (node_id, seq, kind, msgspec.json.encode(body).decode()),
        )
        self._db.execute("UPDATE nodes SET coordinator_seq = ? WHERE node_id = ?", (seq, node_id))
        self._db.notify(OUTBOUND, node_id)
        return seq

    def unsent(self, node_id: str, from_seq: int) -> list[tuple[int, ReliableBody]]:
        """The messages of the node's stream from ``from_seq`` on, in seq order: what a
        session that numbered those before has still to send."""
        rows = self._db.execute(
            "SELECT seq, type, body FROM outbound WHERE node_id = ? AND seq >= ? ORDER BY seq",
            (node_id, from_seq),
        ).fetchall()
        return [
            (int(seq), msgspec.json.decode(body.encode(), type=_OUTBOUND_BODIES[kind]))
            for seq, kind, body in rows
        ]

    def session_opened(self, node_id: str, coordinator: str, session: str) -> None:
        """Tell every coordinator on the database (:data:`SESSION`) that ``coordinator``
        holds the node's session now: one holding an older one closes it."""
        self._db.notify(SESSION, f"{coordinator} {session} {node_id}")

    def ack_outbound(self, node_id: str, seq: int) -> None:
        """The node stored everything up to ``seq``: forget it."""
        with self._db.transaction():
            self.forget_acked(node_id, seq)

    def forget_acked(self, node_id: str, seq: int) -> None:
        """:meth:`ack_outbound` in the caller's transaction (a group commit's)."""
        self._db.execute("DELETE FROM outbound WHERE node_id = ? AND seq <= ?", (node_id, seq))
        self._db.execute(
            "UPDATE nodes SET coordinator_acked = ? WHERE node_id = ? AND coordinator_acked < ?",
            (seq, node_id, seq),
        )

    def sender(self, node_id: str) -> ReliableSender:
        """The coordinator's sender to a node, rebuilt from what the store keeps."""
        outbound = self.outbound(node_id)
        sender = ReliableSender(next_seq=outbound.acked + 1)
        for seq, kind, body in outbound.pending:
            # The rows are contiguous after the acked seq: each was numbered by a sender.
            message = sender.send(msgspec.convert(body, _OUTBOUND_BODIES[kind]))
            assert message.seq == seq, f"outbound to {node_id}: seq {seq} after {message.seq - 1}"
        return sender

    def resume_sender(self, node_id: str, agent_has: int) -> tuple[ReliableSender, bool]:
        """The sender to a node, its pending messages those after the agent's last stored
        seq; and whether the store has still to forget up to that seq (:meth:`forget_acked`:
        the caller's to write, where it writes without waiting).

        Raises:
            SequenceError: ``ack_ahead`` / ``ack_behind`` (:meth:`ReliableSender.resend_from`).
        """
        sender = self.sender(node_id)
        stored_ack = sender.acked_seq
        sender.resend_from(agent_has)
        return sender, agent_has > stored_ack
