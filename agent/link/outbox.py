"""The durable outbox: what the agent must deliver, numbered, until the coordinator acks it.

Every reliable message (profile attestations, job status, logs and results, telemetry) is
appended here first and gets the next ``seq``; the link sends :meth:`Outbox.pending` and
removes what the coordinator acknowledges with the cumulative :meth:`Outbox.ack`. Seqs
start at 1, are strictly increasing, contiguous, and never reused, across restarts and
after acked rows are gone.

Only :data:`DROPPABLE` kinds (telemetry) may be dropped, and only when the unacked ones
exceed the cap given to :meth:`Outbox.open`. A dropped row keeps its seq and kind; its body
becomes :data:`TOMBSTONE` and its entry says ``dropped=True``, so the stream the
coordinator receives stays gap-free (ARCHITECTURE.md, "Nothing acknowledged is lost").
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import msgspec

from agent.errors import OutboxError

__all__ = [
    "DEFAULT_MAX_TELEMETRY_BYTES",
    "DEFAULT_MAX_TELEMETRY_ROWS",
    "DROPPABLE",
    "SCHEMA_VERSION",
    "TOMBSTONE",
    "Entry",
    "Outbox",
    "OutboxError",
    "Write",
]

T = TypeVar("T")
#: More writes to run inside an outbox transaction.
Write = Callable[[sqlite3.Connection], None]

#: Kinds that may be dropped under the cap. Every other kind, including kinds added later,
#: is kept until acked. ``job_log`` is deliberately not here: it is bounded at its source
#: (the sandbox caps each job's log, the protocol caps each chunk) and new jobs only come
#: from a connected coordinator, so offline it cannot grow without bound; and it is the
#: user's output, not our monitoring. Telemetry is the one kind produced at a steady rate
#: for as long as the coordinator is away.
DROPPABLE: frozenset[str] = frozenset({"telemetry"})

#: Live (not yet dropped) unacked telemetry allowed before the oldest is thinned: a day
#: even if every 1 s sample went in its own batch, and a disk budget nobody will notice.
DEFAULT_MAX_TELEMETRY_ROWS = 86_400
DEFAULT_MAX_TELEMETRY_BYTES = 64 * 1024 * 1024

#: The body a dropped batch is replaced by: the one batch its seq stood for is gone.
# A protocol TelemetryBody: no samples, one batch shed (docs/protocol.md, telemetry).
TOMBSTONE = b'{"samples":[],"dropped":1}'

# Each entry migrates the file from version i to i + 1 (PRAGMA user_version). Acked rows
# are deleted rather than flagged: acks are cumulative, so meta.last_acked_seq says all a
# per-row ``acked`` column would, and deleting keeps the file as small as the backlog.
# meta.last_seq is the seq counter; it outlives the rows, so seqs are never reused.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            body BLOB NOT NULL,
            created REAL NOT NULL,
            size INTEGER NOT NULL,
            dropped INTEGER NOT NULL DEFAULT 0 CHECK (dropped IN (0, 1))
        ) STRICT""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT, WITHOUT ROWID",
        """INSERT INTO meta (key, value) VALUES
            ('last_seq', 0), ('last_acked_seq', 0), ('last_coordinator_seq', 0)""",
        "CREATE TABLE dropped (kind TEXT PRIMARY KEY, count INTEGER NOT NULL) STRICT",
    ),
    # The job ledger (agent/jobs/ledger.py) lives in the same file, so that a job's state and
    # the messages that report it commit in one transaction.
    (
        """CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            code TEXT NOT NULL DEFAULT '',
            detail TEXT NOT NULL DEFAULT '',
            offer BLOB NOT NULL,
            gpus TEXT NOT NULL DEFAULT '[]',
            container_id TEXT,
            exit_code INTEGER,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            receipt BLOB
        ) STRICT""",
        "CREATE INDEX jobs_by_state ON jobs (state)",
        """CREATE TABLE job_logs (
            job_id TEXT NOT NULL,
            n INTEGER NOT NULL,
            stream TEXT NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (job_id, n)
        ) STRICT, WITHOUT ROWID""",
        """CREATE TABLE receipts (
            n INTEGER PRIMARY KEY,
            job_id TEXT NOT NULL UNIQUE,
            digest TEXT NOT NULL
        ) STRICT""",
    ),
    # The images the agent pulled (agent/jobs/image_cache.py): only these are ever removed
    # to keep within the cache's budget, least recently used first.
    (
        """CREATE TABLE images (
            reference TEXT PRIMARY KEY,
            image_id TEXT NOT NULL,
            size INTEGER NOT NULL,
            pulled REAL NOT NULL,
            used REAL NOT NULL
        ) STRICT, WITHOUT ROWID""",
    ),
    # Uploads that outlive the agent (agent/jobs/machine.py, uploading): the receipt's
    # makings and the spool a job's outputs wait in, and which outputs the store has.
    (
        "ALTER TABLE jobs ADD COLUMN held BLOB",
        "ALTER TABLE jobs ADD COLUMN spool TEXT",
        """CREATE TABLE job_uploads (
            job_id TEXT NOT NULL,
            path TEXT NOT NULL,
            PRIMARY KEY (job_id, path)
        ) STRICT, WITHOUT ROWID""",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One unacked message, as the link sends it."""

    seq: int
    kind: str
    body: bytes
    created: float
    dropped: bool = False
    """True when the cap dropped this batch and ``body`` is :data:`TOMBSTONE`."""


_IN_DROPPABLE = "kind IN ({})".format(", ".join(f"'{k}'" for k in sorted(DROPPABLE)))


class Outbox:
    """A SQLite-backed, gap-free, crash-safe queue of messages for the coordinator.

    One process owns a file: the counters behind the cap are kept in memory. Every method
    is thread-safe, and every one that writes returns once its transaction is on disk.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        max_telemetry_rows: int = DEFAULT_MAX_TELEMETRY_ROWS,
        max_telemetry_bytes: int = DEFAULT_MAX_TELEMETRY_BYTES,
    ) -> None:
        if max_telemetry_rows < 1 or max_telemetry_bytes < 1:
            raise OutboxError("bad_argument", "the telemetry caps must be positive")
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self.max_telemetry_rows = max_telemetry_rows
        self.max_telemetry_bytes = max_telemetry_bytes
        with self._tx() as db:
            self._bytes = _one(db, "SELECT coalesce(sum(size), 0) FROM outbox")
            self._live_rows, self._live_bytes = db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM outbox"
                f" WHERE dropped = 0 AND {_IN_DROPPABLE}"
            ).fetchone()
            self._last_seq = _meta(db, "last_seq")
            self._last_acked = _meta(db, "last_acked_seq")

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        max_telemetry_rows: int = DEFAULT_MAX_TELEMETRY_ROWS,
        max_telemetry_bytes: int = DEFAULT_MAX_TELEMETRY_BYTES,
    ) -> Outbox:
        """Open the outbox at ``path``, creating it (mode 0600) and migrating its schema."""
        try:
            # SQLite gives its -wal and -shm files the mode of the database file.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError("storage_error", f"cannot open {path}: {exc}") from exc
        try:
            _configure(conn)
            _migrate(conn)
            return cls(
                conn,
                max_telemetry_rows=max_telemetry_rows,
                max_telemetry_bytes=max_telemetry_bytes,
            )
        except sqlite3.Error as exc:
            conn.close()
            raise OutboxError("storage_error", f"{path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise

    def append(self, kind: str, body: bytes, now: float) -> int:
        """Store one message and return its seq."""
        return self.append_many([(kind, body)], now)[0]

    def append_many(
        self,
        items: Iterable[tuple[str, bytes]],
        now: float,
        *,
        coordinator_seq: int | None = None,
        also: Write | None = None,
    ) -> list[int]:
        """Store several messages in one transaction (one fsync) and return their seqs.

        With ``coordinator_seq``, the same transaction records that coordinator message as
        processed: what handling it produced and the fact that it was handled are stored
        together, so a crash between the two cannot make it run twice. ``also`` runs more
        writes (the job ledger's) inside the same transaction.
        """
        rows = list(items)
        if (not rows and coordinator_seq is None and also is None) or any(
            not kind for kind, _ in rows
        ):
            raise OutboxError("bad_argument", "append needs messages, each with a kind")
        with self._tx() as db:
            if coordinator_seq is not None:
                _advance_coordinator_seq(db, coordinator_seq)
            if also is not None:
                also(db)
            if not rows:
                return []
            first = _meta(db, "last_seq") + 1
            db.executemany(
                "INSERT INTO outbox (seq, kind, body, created, size) VALUES (?, ?, ?, ?, ?)",
                [(first + i, kind, body, now, len(body)) for i, (kind, body) in enumerate(rows)],
            )
            last = first + len(rows) - 1
            db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (last,))
            added = [len(body) for kind, body in rows if kind in DROPPABLE]
            live_rows = self._live_rows + len(added)
            live_bytes = self._live_bytes + sum(added)
            dropped, freed = self._thin(db, live_rows, live_bytes)
        # Only after the commit: a failed transaction leaves the counters as they were.
        self._last_seq = last
        self._bytes += sum(len(body) for _, body in rows) - freed + dropped * len(TOMBSTONE)
        self._live_rows = live_rows - dropped
        self._live_bytes = live_bytes - freed
        return list(range(first, last + 1))

    def _thin(self, db: sqlite3.Connection, live_rows: int, live_bytes: int) -> tuple[int, int]:
        """Drop every other batch of the oldest half of live telemetry until under the cap.

        Returns how many batches were dropped and their bytes. The newest half stays at full
        resolution; each pass halves the density of what is older, so older batches fade
        out (every 2nd, then every 4th, ...) rather than being cut at a line: the kept
        batches reach back about one and a half times the row cap. A pass frees a quarter of the
        cap, so it runs once per many appends and costs O(1) amortized per append.
        """
        dropped = freed = 0
        while (
            live_rows - dropped > self.max_telemetry_rows
            or live_bytes - freed > self.max_telemetry_bytes
        ):
            oldest_half = db.execute(
                f"SELECT seq, size FROM outbox WHERE dropped = 0 AND {_IN_DROPPABLE}"
                " ORDER BY seq LIMIT ?",
                (max(1, (live_rows - dropped) // 2),),
            ).fetchall()
            victims = oldest_half[::2]
            db.executemany(
                "UPDATE outbox SET body = ?, size = ?, dropped = 1 WHERE seq = ?",
                [(TOMBSTONE, len(TOMBSTONE), seq) for seq, _ in victims],
            )
            dropped += len(victims)
            freed += sum(size for _, size in victims)
        if dropped:
            db.execute(
                "INSERT INTO dropped (kind, count) VALUES ('telemetry', ?)"
                " ON CONFLICT (kind) DO UPDATE SET count = count + excluded.count",
                (dropped,),
            )
        return dropped, freed

    def query(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``read`` in a read transaction of this file (the job ledger's reads)."""
        with self._tx(write=False) as db:
            return read(db)

    def pending(self, after_seq: int, limit: int) -> list[Entry]:
        """The unacked messages after ``after_seq``, at most ``limit``, in seq order."""
        if limit < 1:
            raise OutboxError("bad_argument", f"limit must be positive, got {limit}")
        with self._tx(write=False) as db:
            rows = db.execute(
                "SELECT seq, kind, body, created, dropped FROM outbox"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [
            Entry(seq=seq, kind=kind, body=body, created=created, dropped=bool(dropped))
            for seq, kind, body, created, dropped in rows
        ]

    def ack(self, seq: int) -> int:
        """Mark everything up to ``seq`` delivered; return how many messages that removed."""
        if seq < 0:
            raise OutboxError("bad_argument", f"seq must not be negative, got {seq}")
        with self._tx() as db:
            last_seq = _meta(db, "last_seq")
            if seq > last_seq:
                raise OutboxError("ack_ahead", f"ack {seq} beyond the last seq {last_seq}")
            if seq <= _meta(db, "last_acked_seq"):
                return 0  # a repeated or stale ack, normal after a reconnect
            count, size, live_rows, live_bytes = db.execute(
                "SELECT count(*), coalesce(sum(size), 0),"
                f" coalesce(sum(dropped = 0 AND {_IN_DROPPABLE}), 0),"
                f" coalesce(sum(CASE WHEN dropped = 0 AND {_IN_DROPPABLE} THEN size END), 0)"
                " FROM outbox WHERE seq <= ?",
                (seq,),
            ).fetchone()
            db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))
            db.execute("UPDATE meta SET value = ? WHERE key = 'last_acked_seq'", (seq,))
        self._last_acked = seq
        self._bytes -= size
        self._live_rows -= live_rows
        self._live_bytes -= live_bytes
        return int(count)

    def last_seq(self) -> int:
        """The seq of the last message appended (0 before the first)."""
        self._db()
        return self._last_seq

    def last_acked(self) -> int:
        """The highest seq the coordinator has acknowledged (0 before the first ack)."""
        self._db()
        return self._last_acked

    def depth(self) -> int:
        """How many messages are unacked."""
        self._db()
        return self._last_seq - self._last_acked

    def depth_bytes(self) -> int:
        """The total body size of the unacked messages."""
        self._db()
        return self._bytes

    def set_last_coordinator_seq(self, seq: int) -> None:
        """Record the last coordinator seq this agent has processed (sent in ``hello``)."""
        with self._tx() as db:
            _advance_coordinator_seq(db, seq)

    def last_coordinator_seq(self) -> int:
        """The last coordinator seq this agent has processed (0 before the first)."""
        with self._tx(write=False) as db:
            return _meta(db, "last_coordinator_seq")

    def take_drop_report(self) -> dict[str, int]:
        """How many messages of each kind were dropped since the last report, then reset."""
        with self._tx() as db:
            report = dict(db.execute("SELECT kind, count FROM dropped").fetchall())
            db.execute("DELETE FROM dropped")
        return report

    def close(self) -> None:
        """Close the database; further calls raise ``closed``. Closing twice is harmless."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError("closed", "the outbox is closed")
        return self._conn

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock, with SQLite's errors turned into ours."""
        with self._lock:
            db = self._db()
            try:
                # IMMEDIATE takes the write lock up front: no SQLITE_BUSY half-way through.
                db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield db
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise OutboxError("storage_error", str(exc)) from exc
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")


def _advance_coordinator_seq(db: sqlite3.Connection, seq: int) -> None:
    current = _meta(db, "last_coordinator_seq")
    if seq < current:
        raise OutboxError("seq_backwards", f"coordinator seq {seq} after {current}")
    db.execute("UPDATE meta SET value = ? WHERE key = 'last_coordinator_seq'", (seq,))


def _configure(conn: sqlite3.Connection) -> None:
    """Put a fresh connection in the modes the outbox's promises rest on."""
    mode = _one_str(conn, "PRAGMA journal_mode = WAL")
    if mode != "wal":
        raise OutboxError("storage_error", f"the database refused WAL mode ({mode})")
    # FULL, not NORMAL. Either survives a kill -9: a committed transaction is in the WAL
    # file, in the OS page cache, before COMMIT returns. NORMAL skips the fsync at commit,
    # so a power loss or kernel panic can roll back the last commits, and here that is
    # not just a loss: a message may already have been sent and stored by the
    # coordinator, the rolled-back counter would hand its seq to a new message, and the
    # coordinator would drop that one as a duplicate of (node, seq). With FULL, append
    # returns only once the row is on disk, so nothing can leave that the disk can forget.
    # The cost is one fsync per transaction; append_many batches for the hot path.
    conn.execute("PRAGMA synchronous = FULL")
    # A second process (a debugging shell, a future jobs ledger on the same file) may hold
    # the write lock for a moment; wait rather than fail.
    conn.execute("PRAGMA busy_timeout = 5000")


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION`; refuse a file from a newer agent."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read under the write lock, so two processes opening a new file cannot both
        # create the tables.
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise OutboxError(
                "schema_too_new",
                f"schema version {version}, this agent knows up to {SCHEMA_VERSION}",
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target - 1]:
                conn.execute(statement)
            # user_version is in the file header and part of the transaction.
            conn.execute(f"PRAGMA user_version = {target}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _meta(db: sqlite3.Connection, key: str) -> int:
    return _one(db, "SELECT value FROM meta WHERE key = ?", (key,))


def _one(db: sqlite3.Connection, sql: str, params: tuple[object, ...] = ()) -> int:
    return int(db.execute(sql, params).fetchone()[0])


def _one_str(db: sqlite3.Connection, sql: str) -> str:
    return str(db.execute(sql).fetchone()[0])
