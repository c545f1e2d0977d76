"""The gateway's tables in the coordinator's store: client API keys, request records.

A key is kept as the SHA-256 of its text, never the text: the store (a backup, a copy)
gives nobody a usable key. A request record names the key by its id.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec

from coordinator.db import Database
from coordinator.errors import GatewayError

__all__ = [
    "KEY_PREFIX",
    "MAX_UNKNOWN",
    "SCHEMA",
    "UNKNOWN_FOR_S",
    "ApiKey",
    "ApiKeyTable",
    "RequestRecord",
    "RequestTable",
    "ServiceJobs",
    "ServiceRow",
    "hash_key",
]

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_sha256 TEXT NOT NULL UNIQUE,
    rate_per_min INTEGER NOT NULL,
    created REAL NOT NULL,
    revoked REAL
) STRICT;
CREATE TABLE IF NOT EXISTS gateway_requests (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    key_id TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    model TEXT NOT NULL,
    node_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    status INTEGER NOT NULL,
    code TEXT NOT NULL,
    stream INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    tokens_in INTEGER,
    tokens_out INTEGER,
    latency_s REAL NOT NULL,
    ttfb_s REAL,
    ttft_s REAL
) STRICT;
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE TABLE IF NOT EXISTS api_key_rates (
    key_id TEXT PRIMARY KEY,
    tat REAL NOT NULL
) STRICT;
"""
# The shared rate of a key (several coordinators on PostgreSQL), as GCRA: ``tat`` is when
# the key's bucket will be full again; a request moves it one interval (60 s / rate) on from
# now or from where it stands, and passes while that leaves it within a minute of now (a
# full bucket holds a minute's worth: the in-memory bucket's rule, in one row). One
# statement: the row is locked while it is moved, so two coordinators never both take the
# last request.
_TAKE_RATE: Final = """
INSERT INTO api_key_rates AS r (key_id, tat) VALUES (?, ?)
ON CONFLICT (key_id) DO UPDATE SET tat = GREATEST(r.tat, ?) + ?
WHERE GREATEST(r.tat, ?) + ? - ? <= 60.0
RETURNING tat
"""

#: What every key starts with: a secret scanner (and a person) tells it from others.
KEY_PREFIX: Final = "gpk-"
#: Every key's text: the prefix and 32 random bytes, URL-safe base64 (``create``).
_KEY_SHAPE: Final = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{43}")
#: How long a text no key has is refused without a lookup, and how many are remembered.
UNKNOWN_FOR_S: Final = 5.0
MAX_UNKNOWN: Final = 10_000
_KEY_COLUMNS = "key_id, name, rate_per_min, created, revoked"
_RECORD_FIELDS: Final = (
    "at, key_id, method, path, model, node_id, job_id, status, code, stream, attempts,"
    " tokens_in, tokens_out, latency_s, ttfb_s, ttft_s"
)
#: The states of a service job that may become (or be) ready: the gateway knows its models.
LIVE_STATES: Final = (
    "offered",
    "accepted",
    "fetching",
    "pulling",
    "starting",
    "ready",
    "unhealthy",
    "restarting",
)
_NAMES: Final = tuple(name.strip() for name in _RECORD_FIELDS.split(","))


def hash_key(key: str) -> str:
    """The hex SHA-256 a key is stored and looked up by."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """A client key as stored (without its text)."""

    key_id: str
    name: str
    rate_per_min: int
    created: float
    revoked: float | None


class RequestRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One request the gateway answered: who, what, where, how it went, how fast."""

    at: float
    key_id: str
    method: str
    path: str
    model: str
    node_id: str
    """"" when no replica was tried."""
    job_id: str
    status: int
    code: str
    """The gateway's error code; "" when the server's answer passed through whole."""
    stream: bool
    attempts: int
    tokens_in: int | None
    tokens_out: int | None
    latency_s: float
    ttfb_s: float | None
    """Until the server's first response byte."""
    ttft_s: float | None
    """Until the first token: the first event of a stream, the whole answer otherwise."""


class ApiKeyTable:
    """Client keys: made, listed, revoked, looked up by their hash.

    The keys found are kept in memory by their hash (as many as there are keys: an
    unknown key is never kept); a revocation, through this same table, drops its entry. On
    a store that other coordinators share, a key is read at each request instead: one
    revoked through another coordinator is refused here at once.

    A flood of junk keys costs no lookup each: a text not of a key's shape is refused
    unread, and an unknown one is remembered (by its hash, :data:`UNKNOWN_FOR_S`, at most
    :data:`MAX_UNKNOWN` of them) and refused unread meanwhile. That never refuses a key
    that exists: a key's text is shown once its row is written, so no client can send it
    before; the time bounds the odd case of a row written otherwise (a restore, a hand).
    """

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._clock = clock
        self._found: dict[str, ApiKey] = {}
        self._unknown: dict[str, float] = {}
        """Hashes of texts no key has, and until when they are taken so."""
        self._keeps = db.dialect == "sqlite"
        self.shared = not self._keeps
        """Whether other coordinators use these keys (and :meth:`take_rate`)."""

    def create(self, name: str, rate_per_min: int, now: float) -> tuple[ApiKey, str]:
        """A new key; returns it and its text (which is stored nowhere: shown once)."""
        text = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            key_id="key-" + secrets.token_hex(8),
            name=name,
            rate_per_min=rate_per_min,
            created=now,
            revoked=None,
        )
        self._db.execute(
            "INSERT INTO api_keys (key_id, name, key_sha256, rate_per_min, created)"
            " VALUES (?, ?, ?, ?, ?)",
            (key.key_id, name, hash_key(text), rate_per_min, now),
        )
        return key, text

    def all(self) -> list[ApiKey]:
        """Every key, oldest first."""
        rows = self._db.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created, key_id"
        ).fetchall()
        return [_key(r) for r in rows]

    def find(self, text: str) -> ApiKey | None:
        """The key whose text this is, revoked or not; None when there is none."""
        if not _KEY_SHAPE.fullmatch(text):
            return None
        digest = hash_key(text)
        key = self._found.get(digest)
        if key is not None:
            return key
        now = self._clock()
        if self._unknown.get(digest, now) > now:
            return None
        row = self._db.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_sha256 = ?", (digest,)
        ).fetchone()
        if row is None:
            self._remember_unknown(digest, now)
            return None
        key = _key(row)
        if self._keeps:
            self._found[digest] = key
        return key

    def _remember_unknown(self, digest: str, now: float) -> None:
        if len(self._unknown) >= MAX_UNKNOWN:
            self._unknown = {d: t for d, t in self._unknown.items() if t > now}
            if len(self._unknown) >= MAX_UNKNOWN:  # all fresh: the oldest half goes
                self._unknown = dict(list(self._unknown.items())[MAX_UNKNOWN // 2 :])
        self._unknown[digest] = now + UNKNOWN_FOR_S

    def take_rate(self, key_id: str, rate_per_min: int, now: float) -> float:
        """Take one request of the key's shared rate (PostgreSQL): 0.0, or the seconds to
        wait (nothing taken). Wall time: the coordinators' clocks are one."""
        interval = 60.0 / rate_per_min
        row = self._db.execute(
            _TAKE_RATE,
            (key_id, now + interval, now, interval, now, interval, now),
        ).fetchone()
        if row is not None:
            return 0.0
        (tat,) = self._db.execute(
            "SELECT tat FROM api_key_rates WHERE key_id = ?", (key_id,)
        ).fetchone()
        return max(float(tat), now) + interval - now - 60.0

    def revoke(self, key_id: str, now: float) -> ApiKey:
        """Revoke a key (again: no change).

        Raises:
            GatewayError: ``unknown_key_id``.
        """
        self._db.execute(
            "UPDATE api_keys SET revoked = ? WHERE key_id = ? AND revoked IS NULL", (now, key_id)
        )
        self._found = {h: k for h, k in self._found.items() if k.key_id != key_id}
        row = self._db.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
        ).fetchone()
        if row is None:
            raise GatewayError("unknown_key_id", f"no API key {key_id!r}")
        return _key(row)


class RequestTable:
    """Request records, newest kept to a bound."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, records: list[RequestRecord], keep_rows: int) -> None:
        """Store records in one commit; then keep only the newest ``keep_rows``."""
        marks = ", ".join("?" * len(_NAMES))
        rows = [tuple(_builtin(getattr(r, name)) for name in _NAMES) for r in records]
        with self._db.transaction():
            self._db.executemany(
                f"INSERT INTO gateway_requests ({_RECORD_FIELDS}) VALUES ({marks})", rows
            )
            self._db.execute(
                "DELETE FROM gateway_requests"
                " WHERE id <= (SELECT MAX(id) FROM gateway_requests) - ?",
                (keep_rows,),
            )

    def recent(self, limit: int) -> list[RequestRecord]:
        """The newest records, newest first."""
        rows = self._db.execute(
            f"SELECT {_RECORD_FIELDS} FROM gateway_requests ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [
            msgspec.convert(dict(zip(_NAMES, r, strict=True)), RequestRecord, strict=False)
            for r in rows
        ]


class ServiceRow(msgspec.Struct, frozen=True, kw_only=True):
    """A job that is not over, as the gateway sees it (any kind: the spec says which)."""

    job_id: str
    node_id: str
    state: str
    spec: str
    """Its spec's JSON, as stored."""


class ServiceJobs:
    """The jobs that may serve requests now or later: those in a state that is not final."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._read: tuple[int, list[ServiceRow]] | None = None

    def live(self) -> list[ServiceRow]:
        """Every job in a state of :data:`LIVE_STATES` (the ``jobs_by_state`` index).

        Read again only when the store changed since the last read: a gateway asks at
        every request, and a job's state changes only by a write through this store.
        """
        if self._read is not None and self._read[0] == self._db.changes:
            return self._read[1]
        changes = self._db.changes
        marks = ", ".join("?" * len(LIVE_STATES))
        rows = self._db.execute(
            f"SELECT job_id, node_id, state, spec FROM jobs WHERE state IN ({marks})",
            LIVE_STATES,
        ).fetchall()
        live = [ServiceRow(job_id=r[0], node_id=r[1], state=r[2], spec=r[3]) for r in rows]
        self._read = (changes, live)
        return live


def _builtin(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value


def _key(row: tuple[Any, ...]) -> ApiKey:
    return ApiKey(key_id=row[0], name=row[1], rate_per_min=row[2], created=row[3], revoked=row[4])
