"""The job ledger: every job this node was offered, its state, its log and its receipt.

The tables live in the outbox's SQLite file (agent/link/outbox.py, schema version 4). Every
change is a row of a decision (:mod:`agent.jobs.machine`), written by :meth:`Ledger.write`
inside :meth:`Outbox.append_many` together with the messages that report it, so a job's
state and what the coordinator is told about it commit at once: a crash can never leave a
job marked finished whose result was not queued, nor a result queued twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from agent.jobs.machine import (
    ContainerOf,
    ImagePulled,
    ImageRemoved,
    ImageUsed,
    Logs,
    NewJob,
    PruneLogs,
    Receipted,
    Row,
    Transition,
    Uploaded,
    Uploading,
)
from agent.link.outbox import Outbox, Write
from agent.protocol.jobs import FINAL_STATES

__all__ = ["CachedImage", "JobRecord", "Ledger", "LogLine"]

_COLUMNS = "job_id, state, code, detail, offer, gpus, container_id, exit_code, created, updated"
_FINAL = "({})".format(", ".join(f"'{s}'" for s in sorted(FINAL_STATES)))


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One job as the ledger has it. ``offer`` is the verified offer's JSON (empty for an
    offer refused before it verified); ``gpus`` are the unit ids it was given."""

    job_id: str
    state: str
    code: str
    detail: str
    offer: bytes
    gpus: list[str]
    container_id: str | None
    exit_code: int | None
    created: float
    updated: float

    @property
    def final(self) -> bool:
        """Whether the job will never change again."""
        return self.state in FINAL_STATES


class CachedImage(msgspec.Struct, frozen=True):
    """An image the agent pulled: its ``repository@sha256:...``, local id, unpacked size,
    when it was pulled and last used."""

    reference: str
    image_id: str
    size: int
    pulled: float
    used: float


class LogLine(msgspec.Struct, frozen=True):
    """One stored chunk of a job's output; ``n`` orders them within the job."""

    n: int
    stream: str
    data: str


class Ledger:
    """Reads the ledger, and builds the writes that change it."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    # -- writes ------------------------------------------------------------------------

    @staticmethod
    def write(rows: Iterable[Row], now: float) -> Write:
        """The rows of a decision (agent/jobs/machine.py) as one Write, for
        :meth:`Outbox.append_many` (``also=``) to run in its transaction."""
        listed = list(rows)

        def write(db: sqlite3.Connection) -> None:
            for row in listed:
                _WRITERS[type(row)](db, row, now)

        return write

    # -- reads --------------------------------------------------------------------------

    def cached_images(self) -> list[CachedImage]:
        """The images the agent pulled, least recently used first."""

        def read(db: sqlite3.Connection) -> list[CachedImage]:
            rows = db.execute(
                "SELECT reference, image_id, size, pulled, used FROM images ORDER BY used, pulled"
            ).fetchall()
            return [CachedImage(*row) for row in rows]

        return self.outbox.query(read)

    def get(self, job_id: str) -> JobRecord | None:
        """One job, or None if this node never heard of it."""
        rows = self.outbox.query(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchall()
        )
        return _record(rows[0]) if rows else None

    def unfinished(self) -> list[JobRecord]:
        """Jobs not in a final state, oldest first: after a crash, these were cut short."""
        rows = self.outbox.query(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state NOT IN {_FINAL} ORDER BY created"
            ).fetchall()
        )
        return [_record(row) for row in rows]

    def recent(self, limit: int) -> list[JobRecord]:
        """The newest jobs first."""
        rows = self.outbox.query(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM jobs ORDER BY created DESC, job_id LIMIT ?", (limit,)
            ).fetchall()
        )
        return [_record(row) for row in rows]

    def count_finished_since(self, since: float) -> int:
        """How many jobs ran to a final state (refusals aside) since ``since``."""
        return int(
            self.outbox.query(
                lambda db: db.execute(
                    f"SELECT count(*) FROM jobs WHERE state IN {_FINAL}"
                    " AND state != 'refused' AND updated >= ?",
                    (since,),
                ).fetchone()[0]
            )
        )

    def count_by_state(self) -> dict[str, int]:
        """How many jobs the ledger holds in each state."""
        rows = self.outbox.query(
            lambda db: db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        )
        return {str(state): int(count) for state, count in rows}

    def logs(self, job_id: str, after: int = 0) -> list[LogLine]:
        """A job's stored output after chunk ``after``, in order."""
        rows = self.outbox.query(
            lambda db: db.execute(
                "SELECT n, stream, data FROM job_logs WHERE job_id = ? AND n > ? ORDER BY n",
                (job_id, after),
            ).fetchall()
        )
        return [LogLine(n, stream, data) for n, stream, data in rows]

    def held(self, job_id: str) -> tuple[Uploading, frozenset[str]] | None:
        """A job left ``uploading``: what its receipt will say, its spool, and the outputs
        the store already acknowledged; None if it is not uploading."""

        def read(db: sqlite3.Connection) -> tuple[Any, list[Any]]:
            row = db.execute(
                "SELECT held, detail, spool FROM jobs WHERE job_id = ? AND state = 'uploading'",
                (job_id,),
            ).fetchone()
            done = db.execute("SELECT path FROM job_uploads WHERE job_id = ?", (job_id,))
            return row, done.fetchall()

        row, done = self.outbox.query(read)
        if row is None or row[0] is None:
            return None
        held = Uploading(job_id=job_id, receipt=row[0], detail=row[1], spool=row[2] or "")
        return held, frozenset(str(path) for (path,) in done)

    def receipt(self, job_id: str) -> bytes | None:
        """A job's signed receipt envelope (JSON), if it has one."""
        rows = self.outbox.query(
            lambda db: db.execute("SELECT receipt FROM jobs WHERE job_id = ?", (job_id,)).fetchall()
        )
        return rows[0][0] if rows else None

    def last_receipt_digest(self) -> str:
        """The digest of the node's newest receipt, "" before the first."""
        rows = self.outbox.query(
            lambda db: db.execute("SELECT digest FROM receipts ORDER BY n DESC LIMIT 1").fetchall()
        )
        return str(rows[0][0]) if rows else ""


def _record(row: Any) -> JobRecord:
    job_id, state, code, detail, offer, gpus, container_id, exit_code, created, updated = row
    return JobRecord(
        job_id=job_id,
        state=state,
        code=code,
        detail=detail,
        offer=offer,
        gpus=msgspec.json.decode(gpus, type=list[str]),
        container_id=container_id,
        exit_code=exit_code,
        created=created,
        updated=updated,
    )


def _new_job(db: sqlite3.Connection, row: NewJob, now: float) -> None:
    # Fails (storage_error) if the id is known: ids are run once.
    db.execute(
        "INSERT INTO jobs (job_id, state, code, detail, offer, gpus, created, updated)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            row.job_id,
            row.state,
            row.code,
            row.detail,
            row.offer,
            msgspec.json.encode(list(row.gpus)).decode(),
            now,
            now,
        ),
    )


def _transition(db: sqlite3.Connection, row: Transition, now: float) -> None:
    db.execute(
        "UPDATE jobs SET state = ?, code = ?, detail = ?,"
        " exit_code = coalesce(?, exit_code), updated = ? WHERE job_id = ?",
        (row.state, row.code, row.detail, row.exit_code, now, row.job_id),
    )


def _container_of(db: sqlite3.Connection, row: ContainerOf, now: float) -> None:
    db.execute("UPDATE jobs SET container_id = ? WHERE job_id = ?", (row.container_id, row.job_id))


def _logs(db: sqlite3.Connection, row: Logs, now: float) -> None:
    first = db.execute(
        "SELECT coalesce(max(n), 0) + 1 FROM job_logs WHERE job_id = ?", (row.job_id,)
    ).fetchone()[0]
    db.executemany(
        "INSERT INTO job_logs (job_id, n, stream, data) VALUES (?, ?, ?, ?)",
        [(row.job_id, first + i, stream, data) for i, (stream, data) in enumerate(row.chunks)],
    )


def _receipted(db: sqlite3.Connection, row: Receipted, now: float) -> None:
    db.execute("UPDATE jobs SET receipt = ? WHERE job_id = ?", (row.envelope, row.job_id))
    db.execute("INSERT INTO receipts (job_id, digest) VALUES (?, ?)", (row.job_id, row.digest))


def _uploading(db: sqlite3.Connection, row: Uploading, now: float) -> None:
    db.execute(
        "UPDATE jobs SET held = ?, detail = ?, spool = ? WHERE job_id = ?",
        (row.receipt, row.detail, row.spool, row.job_id),
    )


def _uploaded(db: sqlite3.Connection, row: Uploaded, now: float) -> None:
    db.execute(
        "INSERT OR IGNORE INTO job_uploads (job_id, path) VALUES (?, ?)", (row.job_id, row.path)
    )


def _prune_logs(db: sqlite3.Connection, row: PruneLogs, now: float) -> None:
    db.execute(
        "DELETE FROM job_logs WHERE job_id IN"
        f" (SELECT job_id FROM jobs WHERE state IN {_FINAL} AND updated < ?)",
        (row.before,),
    )


def _image_pulled(db: sqlite3.Connection, row: ImagePulled, now: float) -> None:
    db.execute(
        "INSERT OR REPLACE INTO images (reference, image_id, size, pulled, used)"
        " VALUES (?, ?, ?, ?, ?)",
        (row.reference, row.image_id, row.size, now, now),
    )


def _image_used(db: sqlite3.Connection, row: ImageUsed, now: float) -> None:
    db.execute("UPDATE images SET used = ? WHERE reference = ?", (now, row.reference))


def _image_removed(db: sqlite3.Connection, row: ImageRemoved, now: float) -> None:
    db.execute("DELETE FROM images WHERE reference = ?", (row.reference,))


_WRITERS: dict[type[Any], Callable[[sqlite3.Connection, Any, float], None]] = {
    ImagePulled: _image_pulled,
    ImageUsed: _image_used,
    ImageRemoved: _image_removed,
    NewJob: _new_job,
    Transition: _transition,
    ContainerOf: _container_of,
    Logs: _logs,
    Receipted: _receipted,
    PruneLogs: _prune_logs,
    Uploading: _uploading,
    Uploaded: _uploaded,
}
