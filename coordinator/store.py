"""The reference coordinator's SQLite store: nodes, every reliable message, nonces, outbound.

A message is stored at most once: a seq at or below the node's last (``nodes.agent_seq``)
is a duplicate (an agent resending after a reconnect), a no-op. That last seq is what the
coordinator tells the agent in ``welcome``, so a resend starts right after it. Each write
commits before it returns, so the caller may acknowledge what a call stored as soon as it
returns.

Jobs (offers, states, logs, receipts and their chain) are :mod:`coordinator.jobs_store`'s
tables; the coordinator's stream out and its nonces :mod:`coordinator.stream_store`'s; the
quota and retention :mod:`coordinator.retention`'s: one connection, the same transactions.

A profile is stored in any case once its signature verifies with the node's key; it counts
as verified hardware (``profiles``) only when it also answered a live nonce of this
coordinator. One that answered an expired, unknown or already used nonce is kept in
``unverified_profiles`` with the reason, never in ``profiles``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeAlias

import msgspec

from coordinator.jobs_store import JOBS_SCHEMA, JobEvent, JobTables
from coordinator.retention import Retention
from coordinator.stream_store import Outbound, StreamTables

__all__ = [
    "Added",
    "LatestProfile",
    "NodeRow",
    "Outbound",
    "Store",
    "StoredMessage",
    "Unverified",
    "VerifiedProfile",
]

#: 2 adds ``unverified_profiles``, 3 the job tables; every table is ``IF NOT EXISTS``, so
#: the script upgrades. 4 adds ``nodes.agent_seq`` and ``nodes.stored_bytes`` (:data:`_V4`).
_SCHEMA_VERSION = 4
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    coordinator_seq INTEGER NOT NULL DEFAULT 0,
    coordinator_acked INTEGER NOT NULL DEFAULT 0,
    agent_seq INTEGER NOT NULL DEFAULT 0,
    stored_bytes INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE IF NOT EXISTS messages (
    node_id TEXT NOT NULL REFERENCES nodes(node_id),
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (node_id, seq)
) STRICT, WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_by_type ON messages (node_id, type, seq);
CREATE TABLE IF NOT EXISTS profiles (
    node_id TEXT PRIMARY KEY REFERENCES nodes(node_id),
    seq INTEGER NOT NULL,
    profile TEXT NOT NULL,
    verified_at REAL NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS unverified_profiles (
    node_id TEXT NOT NULL REFERENCES nodes(node_id),
    seq INTEGER NOT NULL,
    profile TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (node_id, seq)
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attest_nonces (
    nonce TEXT PRIMARY KEY,
    node_id TEXT NOT NULL REFERENCES nodes(node_id),
    issued REAL NOT NULL,
    used REAL
) STRICT;
CREATE TABLE IF NOT EXISTS outbound (
    node_id TEXT NOT NULL REFERENCES nodes(node_id),
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (node_id, seq)
) STRICT, WITHOUT ROWID;
"""
    + JOBS_SCHEMA
)
#: Version 4 on a database of an older version: the columns that retention needs. The
#: node's last seq moves out of ``messages`` (retention deletes rows, never that seq), and
#: its stored bytes are counted for its quota.
_V4 = """
ALTER TABLE nodes ADD COLUMN agent_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0;
UPDATE nodes SET
    agent_seq = (SELECT COALESCE(MAX(seq), 0) FROM messages m WHERE m.node_id = nodes.node_id),
    stored_bytes = (SELECT COALESCE(SUM(length(CAST(body AS BLOB))), 0) FROM messages m
                    WHERE m.node_id = nodes.node_id);
"""
#: The body a shed message is stored with: its seq is kept (the stream has no gap), what it
#: carried is not. Telemetry keeps its own shape: a shed batch, as the agent's outbox sheds.
_SHED_TELEMETRY = {"samples": [], "dropped": 1}


#: What :meth:`Store.add` did with a message.
Added: TypeAlias = Literal["stored", "duplicate", "shed"]


class NodeRow(msgspec.Struct, frozen=True, kw_only=True):
    """A node as the coordinator knows it."""

    node_id: str
    public_key: str
    first_seen: float
    last_seen: float
    last_agent_seq: int


class StoredMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One reliable message an agent delivered."""

    seq: int
    type: str
    body: Any
    received: float


class VerifiedProfile(msgspec.Struct, frozen=True, kw_only=True):
    """A node's latest hardware profile whose attestation verified."""

    seq: int
    profile: dict[str, Any]
    verified_at: float


class Unverified(msgspec.Struct, frozen=True, kw_only=True):
    """Why a profile signed by its node is not verified hardware: its nonce did not hold."""

    reason: str
    """The error code: ``stale_nonce`` (expired or never issued) or ``replayed_nonce``."""
    detail: str


class LatestProfile(msgspec.Struct, frozen=True, kw_only=True):
    """A node's newest profile message, verified or not."""

    seq: int
    profile: dict[str, Any]
    received: float
    verified: bool
    unverified: Unverified | None
    """Why it is not verified (None when it is)."""


class Store(StreamTables, JobTables, Retention):
    """The coordinator's database; one connection, used from the event loop's thread."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a message is acknowledged only once it is on disk, so that a coordinator
            # killed -9 (or a power loss) never loses what an agent then deletes.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            if self._db.execute("PRAGMA user_version").fetchone()[0] < _SCHEMA_VERSION:
                columns = {r[1] for r in self._db.execute("PRAGMA table_info(nodes)")}
                self._db.executescript(_SCHEMA)
                if columns and "agent_seq" not in columns:
                    self._db.executescript(_V4)
                self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except sqlite3.Error:
            self._db.close()
            raise

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            self._total_bytes = None  # what the rollback undid is read again when needed
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ nodes

    def node_seen(self, node_id: str, public_key: str, now: float) -> None:
        """Record a node (on first sight) and when it was last seen."""
        self._db.execute(
            "INSERT INTO nodes (node_id, public_key, first_seen, last_seen)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
            " last_seen = excluded.last_seen",
            (node_id, public_key, now, now),
        )

    def public_key(self, node_id: str) -> str | None:
        """The public key a node first presented, or None for a node never seen."""
        row = self._db.execute(
            "SELECT public_key FROM nodes WHERE node_id = ?", (node_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def nodes(self) -> list[NodeRow]:
        """Every node, most recently seen first."""
        rows = self._db.execute(
            "SELECT node_id, public_key, first_seen, last_seen, agent_seq"
            " FROM nodes ORDER BY last_seen DESC, node_id"
        ).fetchall()
        return [
            NodeRow(
                node_id=r[0], public_key=r[1], first_seen=r[2], last_seen=r[3], last_agent_seq=r[4]
            )
            for r in rows
        ]

    def node(self, node_id: str) -> NodeRow | None:
        """One node, or None when it was never seen."""
        return next((n for n in self.nodes() if n.node_id == node_id), None)

    # ------------------------------------------------------------------ agent -> coordinator

    def add(
        self,
        node_id: str,
        seq: int,
        kind: str,
        body: Any,
        now: float,
        *,
        profile: dict[str, Any] | None = None,
        nonce: str | None = None,
        unverified: Unverified | None = None,
        job: JobEvent | None = None,
        quota_bytes: int = 0,
        unverified_quota_bytes: int = 0,
        store_max_bytes: int = 0,
    ) -> Added:
        """Store one message (with its profile, using its nonce; or its job event) in one commit.

        The profile becomes the node's verified one, unless ``unverified`` says why its
        nonce did not hold: then it is kept beside, marked unverified with that reason.

        With ``quota_bytes`` (0: none) the node's stored bytes stay within it (within
        ``unverified_quota_bytes`` too, while the node has no verified profile and this
        message brings none), and all nodes' within ``store_max_bytes``: its oldest
        telemetry is deleted to make room, and when that is not enough the message is
        shed: stored under its seq (the stream keeps no gap) with a placeholder body, and
        without its profile, nonce or job event. A ``job_status`` (small, bounded, and what
        a job's state is made of) is never shed.

        Returns ``"duplicate"`` when ``(node, seq)`` was stored before (a resend): nothing
        changes; else ``"stored"`` or ``"shed"``.
        """
        data = msgspec.json.encode(body)
        with self._transaction():
            row = self._db.execute(
                "SELECT agent_seq, stored_bytes FROM nodes WHERE node_id = ?", (node_id,)
            ).fetchone()
            if row is None:
                raise ValueError(f"no node {node_id!r}: node_seen() comes first")
            if seq <= row[0]:
                return "duplicate"
            added: Added = "stored"
            quota = self._quota(node_id, quota_bytes, unverified_quota_bytes, profile, unverified)
            over = row[1] + len(data) - quota if quota else 0
            slack = quota // 8
            if store_max_bytes:
                slack = min(slack, store_max_bytes // 8) if slack else store_max_bytes // 8
                over = max(over, self._total_stored() + len(data) - store_max_bytes)
            # Evict an eighth of the quota (or cap) more than needed, so that a node
            # streaming at its quota evicts now and then, not on every message.
            if (
                over > 0
                and kind != "job_status"
                and self._evict_telemetry(node_id, over + slack, over) < over
            ):
                added = "shed"
                data = msgspec.json.encode(
                    _SHED_TELEMETRY
                    if kind == "telemetry"
                    else {"shed": "quota_exceeded", "bytes": len(data)}
                )
                profile = nonce = unverified = job = None
            self._db.execute(
                "INSERT INTO messages (node_id, seq, type, body, received) VALUES (?, ?, ?, ?, ?)",
                (node_id, seq, kind, data.decode(), now),
            )
            self._db.execute("UPDATE nodes SET agent_seq = ? WHERE node_id = ?", (seq, node_id))
            self._count_bytes(node_id, len(data))
            if nonce is not None:
                self._db.execute(
                    "UPDATE attest_nonces SET used = ? WHERE nonce = ? AND used IS NULL",
                    (now, nonce),
                )
            if profile is not None and unverified is not None:
                self._db.execute(
                    "INSERT INTO unverified_profiles (node_id, seq, profile, reason, detail)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        node_id,
                        seq,
                        msgspec.json.encode(profile).decode(),
                        unverified.reason,
                        unverified.detail,
                    ),
                )
            elif profile is not None:
                self._db.execute(
                    "INSERT INTO profiles (node_id, seq, profile, verified_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
                    " seq = excluded.seq, profile = excluded.profile,"
                    " verified_at = excluded.verified_at",
                    (node_id, seq, msgspec.json.encode(profile).decode(), now),
                )
            if job is not None:
                self._apply_job_event(node_id, seq, job, now)
        return added

    def last_agent_seq(self, node_id: str) -> int:
        """The highest seq stored from a node (0 when none), kept when retention deletes it."""
        row = self._db.execute(
            "SELECT agent_seq FROM nodes WHERE node_id = ?", (node_id,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def messages(
        self, node_id: str, kind: str, *, since_seq: int = 0, limit: int = 1000
    ) -> list[StoredMessage]:
        """A node's messages of one type after ``since_seq``, in seq order."""
        rows = self._db.execute(
            "SELECT seq, type, body, received FROM messages"
            " WHERE node_id = ? AND type = ? AND seq > ? ORDER BY seq LIMIT ?",
            (node_id, kind, since_seq, limit),
        ).fetchall()
        return [
            StoredMessage(seq=r[0], type=r[1], body=msgspec.json.decode(r[2]), received=r[3])
            for r in rows
        ]

    def latest(self, node_id: str, kind: str) -> StoredMessage | None:
        """A node's newest message of one type."""
        row = self._db.execute(
            "SELECT seq, type, body, received FROM messages"
            " WHERE node_id = ? AND type = ? ORDER BY seq DESC LIMIT 1",
            (node_id, kind),
        ).fetchone()
        if row is None:
            return None
        return StoredMessage(
            seq=row[0], type=row[1], body=msgspec.json.decode(row[2]), received=row[3]
        )

    def all_seqs(self, node_id: str) -> list[int]:
        """Every seq stored from a node, in order (what the no-gap tests check)."""
        rows = self._db.execute(
            "SELECT seq FROM messages WHERE node_id = ? ORDER BY seq", (node_id,)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def profile(self, node_id: str) -> VerifiedProfile | None:
        """A node's latest verified hardware profile."""
        row = self._db.execute(
            "SELECT seq, profile, verified_at FROM profiles WHERE node_id = ?", (node_id,)
        ).fetchone()
        if row is None:
            return None
        return VerifiedProfile(seq=row[0], profile=msgspec.json.decode(row[1]), verified_at=row[2])

    def latest_profile(self, node_id: str) -> LatestProfile | None:
        """A node's newest profile, whether it verified and, if not, why."""
        latest = self.latest(node_id, "profile")
        if latest is None:
            return None
        verified = self.profile(node_id)
        if verified is not None and verified.seq == latest.seq:
            return LatestProfile(
                seq=latest.seq,
                profile=verified.profile,
                received=latest.received,
                verified=True,
                unverified=None,
            )
        row = self._db.execute(
            "SELECT profile, reason, detail FROM unverified_profiles WHERE node_id = ? AND seq = ?",
            (node_id, latest.seq),
        ).fetchone()
        profile: dict[str, Any] = {} if row is None else msgspec.json.decode(row[0])
        reason = (
            Unverified(reason="unknown", detail="no verification recorded")
            if row is None
            else Unverified(reason=row[1], detail=row[2])
        )
        return LatestProfile(
            seq=latest.seq,
            profile=profile,
            received=latest.received,
            verified=False,
            unverified=reason,
        )
