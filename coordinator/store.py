"""The reference coordinator's store: its tables over one connection, to a SQLite file
or a PostgreSQL database (:mod:`coordinator.db`).

:class:`Store` holds one object per group of tables, each on the same
:class:`coordinator.db.Database`: :attr:`Store.nodes` (nodes, their messages and profiles),
:attr:`Store.streams` (the coordinator's stream out, attestation nonces), :attr:`Store.jobs`
(offers, states, logs, receipts and their chain), :attr:`Store.retention` (quota and
telemetry retention), :attr:`Store.deployments` (deployments and their replicas),
:attr:`Store.api_keys` and :attr:`Store.requests` (the gateway's client keys and request
records). :meth:`Store.add` is the one write that spans them: a node's message with what
it carries, in one commit.

A message is stored at most once: a seq at or below the node's last (``nodes.agent_seq``)
is a duplicate (an agent resending after a reconnect), a no-op. That last seq is what the
coordinator tells the agent in ``welcome``, so a resend starts right after it. Each write
commits before it returns, so the caller may acknowledge what a call stored as soon as it
returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, TypeAlias, TypeVar

import msgspec

from coordinator.db import Database, DbTarget, SqliteDatabase, driver_errors
from coordinator.db_open import open_database
from coordinator.deployments_store import SCHEMA as DEPLOYMENTS_SCHEMA
from coordinator.deployments_store import DeploymentTable
from coordinator.downsample import SCHEMA as DOWNSAMPLE_SCHEMA
from coordinator.gateway.tables import SCHEMA as GATEWAY_SCHEMA
from coordinator.gateway.tables import ApiKeyTable, RequestTable, ServiceJobs
from coordinator.jobs_store import JobEvent, JobTable
from coordinator.nodes_store import STORED_SIZE, NodeTable, Unverified
from coordinator.presence_store import SCHEMA as PRESENCE_SCHEMA
from coordinator.presence_store import Presence
from coordinator.retention import Quotas, Retention
from coordinator.stream_store import StreamTable

__all__ = ["Added", "Message", "Store"]

#: 2 adds ``unverified_profiles``, 3 the job tables; every table is ``IF NOT EXISTS``, so
#: the script upgrades. 4 adds ``nodes.agent_seq`` and ``nodes.stored_bytes`` (:data:`_V4`);
#: 5 the deployments (:mod:`coordinator.deployments_store`); 6 the gateway's tables
#: (:data:`coordinator.gateway.tables.SCHEMA`); 7 the per-minute telemetry aggregates
#: (:mod:`coordinator.downsample`); 8 who holds each node's session when several
#: coordinators share the database (:mod:`coordinator.presence_store`); 9 telemetry kept as
#: the DEFLATE stream it came in, and two more columns (:data:`_V9_COLUMNS`).
_SCHEMA_VERSION = 9
_SCHEMA = """
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
    deflated BLOB,
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
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL REFERENCES nodes(node_id),
    offer TEXT NOT NULL,
    spec TEXT NOT NULL,
    offer_sha256 TEXT NOT NULL,
    offer_seq INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL,
    code TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    cancel_requested REAL,
    cancel_reason TEXT NOT NULL DEFAULT '',
    receipt TEXT,
    receipt_sha256 TEXT,
    receipt_envelope TEXT,
    receipt_problems TEXT NOT NULL DEFAULT '[]',
    log_bytes INTEGER NOT NULL DEFAULT 0,
    log_dropped_bytes INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created DESC);
CREATE TABLE IF NOT EXISTS job_logs (
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    seq INTEGER NOT NULL,
    stream TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipt_chain (
    node_id TEXT PRIMARY KEY REFERENCES nodes(node_id),
    last_receipt TEXT NOT NULL,
    receipts INTEGER NOT NULL,
    breaks INTEGER NOT NULL
) STRICT;
"""

#: Version 4 on a database of an older version: the columns that retention needs. The
#: node's last seq moves out of ``messages`` (retention deletes rows, never that seq), and
#: its stored bytes are counted for its quota.
_V4 = f"""
ALTER TABLE nodes ADD COLUMN agent_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0;
UPDATE nodes SET
    agent_seq = (SELECT COALESCE(MAX(seq), 0) FROM messages m WHERE m.node_id = nodes.node_id),
    stored_bytes = (SELECT COALESCE(SUM({STORED_SIZE}), 0) FROM messages m
                    WHERE m.node_id = nodes.node_id);
"""
#: Version 9's columns on an older database: (table, column, its type): telemetry's frames
#: as they came, deflated; where a coordinator's gateway is reached by the others; a
#: deployment's registry logins.
_V9_COLUMNS = (
    ("messages", "deflated", "BLOB"),
    ("coordinators", "peer_url", "TEXT NOT NULL DEFAULT ''"),
    ("deployments", "registry_logins", "TEXT NOT NULL DEFAULT '{}'"),
)
#: The body a shed message is stored with: its seq is kept (the stream has no gap), what it
#: carried is not. Telemetry keeps its own shape: a shed batch, as the agent's outbox sheds.
_SHED_TELEMETRY = {"samples": [], "dropped": 1}


T = TypeVar("T")

#: What :meth:`Store.add` did with a message.
Added: TypeAlias = Literal["stored", "duplicate", "shed"]


class Message(NamedTuple):
    """One message of a node's stream to store (:meth:`Store.add`'s arguments)."""

    node_id: str
    seq: int
    kind: str
    body: Any
    """Encoded with msgspec as it is: a Struct whose samples are msgspec.Raw is stored as
    the bytes received."""
    now: float
    profile: dict[str, Any] | None = None
    nonce: str | None = None
    unverified: Unverified | None = None
    job: JobEvent | None = None
    deflated: bytes | None = None
    """Telemetry's whole frame as the DEFLATE stream it came in, when it came so: stored
    instead of ``body`` (about a tenth of it)."""


class Store:
    """The coordinator's database: its tables, composed over one connection."""

    def __init__(
        self, target: DbTarget, quotas: Quotas | None = None, *, checkpoints: bool = True
    ) -> None:
        """Open (or create, or upgrade) the store at ``target`` (a SQLite file, or a
        PostgreSQL URL), its messages held to ``quotas`` (none by default).

        ``checkpoints=False``: this connection never copies SQLite's WAL into the file; a
        connection that does must be open beside it (the coordinator's group-commit writer).
        """
        self._db = open_database(target, checkpoints=checkpoints)
        try:
            if self._db.schema_version() < _SCHEMA_VERSION:
                _create(self._db)
        except driver_errors():
            self._db.close()
            raise
        self.nodes = NodeTable(self._db)
        self.streams = StreamTable(self._db)
        self.jobs = JobTable(self._db, self.streams)
        self.retention = Retention(self._db, quotas or Quotas())
        self.deployments = DeploymentTable(self._db)
        self.api_keys = ApiKeyTable(self._db)
        self.requests = RequestTable(self._db)
        self.services = ServiceJobs(self._db)
        self.presence = Presence(self._db)
        self.shared = self._db.dialect == "postgres"
        """Whether other coordinators may use this store (PostgreSQL's; a SQLite file has
        one)."""

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def checkpoint(self) -> None:
        """Copy what SQLite's WAL holds into the file, as far as readers allow (PASSIVE:
        nobody waits); nothing on PostgreSQL, whose server does its own."""
        if isinstance(self._db, SqliteDatabase):
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

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
        deflated: bytes | None = None,
    ) -> Added:
        """Store one message (with its profile, using its nonce; or its job event) in one commit.

        The profile becomes the node's verified one, unless ``unverified`` says why its
        nonce did not hold: then it is kept beside, marked unverified with that reason.

        Within the store's :class:`~coordinator.retention.Quotas` the node's oldest
        telemetry is deleted to make room (:meth:`Retention.make_room`), and when that is not
        enough the message is shed: stored under its seq (the stream keeps no gap) with a
        placeholder body, and without its profile, nonce or job event. A ``job_status``
        (small, bounded, and what a job's state is made of) is never shed.

        Returns ``"duplicate"`` when ``(node, seq)`` was stored before (a resend): nothing
        changes; else ``"stored"`` or ``"shed"``.
        """
        with self._db.transaction():
            return self.add_in_transaction(
                Message(node_id, seq, kind, body, now, profile, nonce, unverified, job, deflated)
            )

    def run_group(self, calls: Sequence[Callable[[Store], T]]) -> list[T | Exception]:
        """Run each call on this store, all in one commit (group commit).

        A call that fails is undone alone and its error returned in its place; the others
        still commit. Nothing is committed before this returns, so no message of the group
        may be acknowledged before then. Each call acts on the store alone: it may run
        twice, the first time undone.
        """
        failures: tuple[type[Exception], ...] = (ValueError, *driver_errors())
        # A savepoint around each call is two more round trips to a PostgreSQL server a
        # message (a third of a group's time): the group goes without them, and only when
        # one of its calls fails does it go again, each call in a savepoint of its own.
        try:
            with self._db.transaction():
                return [call(self) for call in calls]
        except failures:
            pass
        results: list[T | Exception] = []
        with self._db.transaction():
            for call in calls:
                try:
                    with self._db.savepoint():
                        results.append(call(self))
                except failures as exc:  # this call's, not the group's
                    results.append(exc)
        return results

    def add_in_transaction(self, m: Message) -> Added:
        """:meth:`add` in the caller's transaction."""
        node_id, seq, kind, now = m.node_id, m.seq, m.kind, m.now
        profile, nonce, unverified, job = m.profile, m.nonce, m.unverified, m.job
        # Locked until the commit where a transaction does not hold the whole store: a
        # second coordinator storing this node's same seq waits, then finds it a duplicate.
        standing = self.nodes.standing(node_id)
        if standing is None:
            raise ValueError(f"no node {node_id!r}: nodes.seen() comes first")
        if seq <= standing.agent_seq:
            return "duplicate"
        # Telemetry as it came, deflated: a tenth of the bytes to write, log and fsync (on
        # PostgreSQL also to send to the server, and for it to compress and TOAST).
        deflated = (m.deflated or None) if kind == "telemetry" else None
        data = deflated or msgspec.json.encode(m.body)
        added: Added = "stored"
        verified = standing.verified or (profile is not None and unverified is None)
        if kind != "job_status" and not self.retention.make_room(
            node_id, len(data), stored=standing.stored_bytes, verified=verified
        ):
            added, deflated = "shed", None
            data = msgspec.json.encode(
                _SHED_TELEMETRY
                if kind == "telemetry"
                else {"shed": "quota_exceeded", "bytes": len(data)}
            )
            profile = nonce = unverified = job = None
        text = "" if deflated else data.decode()
        self.nodes.insert_message(node_id, seq, kind, text, now, deflated=deflated, size=len(data))
        self.retention.counted(len(data))
        if nonce is not None:
            self.streams.use_nonce(nonce, now)
        if profile is not None:
            self.nodes.insert_profile(node_id, seq, profile, now, unverified)
        if job is not None:
            self.jobs.apply(node_id, seq, job, now)
        return added


def _create(db: Database) -> None:
    """Create the schema, or upgrade an older one (every table ``IF NOT EXISTS``; the
    columns versions 4 and 9 added, by :data:`_V4` and :data:`_V9_COLUMNS`)."""
    script = _SCHEMA + DEPLOYMENTS_SCHEMA + GATEWAY_SCHEMA + DOWNSAMPLE_SCHEMA + PRESENCE_SCHEMA
    upgrade = ""
    if isinstance(db, SqliteDatabase):
        # 9 first: 4 counts the bytes stored, deflated ones too.
        for table, column, kind in _V9_COLUMNS:
            columns = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if columns and column not in columns:
                upgrade += f"ALTER TABLE {table} ADD COLUMN {column} {kind};"
        columns = {r[1] for r in db.execute("PRAGMA table_info(nodes)")}
        upgrade += _V4 if columns and "agent_seq" not in columns else ""
    else:
        upgrade = "".join(
            f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind};"
            for table, column, kind in _V9_COLUMNS
        )
        # The server compresses a large body itself: with lz4 rather than its default
        # pglz, several times faster, for ~56 KB of telemetry a message.
        upgrade += "ALTER TABLE messages ALTER COLUMN body SET COMPRESSION lz4;"
    db.create_schema(script, _SCHEMA_VERSION, upgrade=upgrade)
