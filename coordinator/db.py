"""The coordinator's one SQLite connection, and its transactions: what every table shares.

Each write commits before it returns (autocommit, ``BEGIN IMMEDIATE`` for the writes that
go together), so the caller may acknowledge what a call stored as soon as it returns.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Database"]


class Database:
    """One connection to the store's file, used from one thread (the event loop's, or the
    group-commit writer's: :mod:`coordinator.group_commit`)."""

    def __init__(self, path: Path) -> None:
        # Two connections write the file (this one and the group-commit writer's): one
        # waits for the other's transaction, up to the timeout.
        self._conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        self.rollbacks = 0
        """How many transactions rolled back: what was read before one may be undone."""
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a message is acknowledged only once it is on disk, so that a coordinator
            # killed -9 (or a power loss) never loses what an agent then deletes.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error:
            self._conn.close()
            raise

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        """Run one statement."""
        return self._conn.execute(sql, args)

    @property
    def changes(self) -> int:
        """Rows this connection changed since it opened: every write of the store's counts,
        so an unchanged count means nothing read before has changed."""
        return self._conn.total_changes

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Run one statement for each row."""
        self._conn.executemany(sql, rows)

    def executescript(self, sql: str) -> None:
        """Run a script of statements (the schema)."""
        self._conn.executescript(sql)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Commit what the block writes together, or none of it."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            self.rollbacks += 1
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Within a transaction: keep what the block writes, or undo only that."""
        self._conn.execute("SAVEPOINT part")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK TO part")
            self._conn.execute("RELEASE part")
            self.rollbacks += 1
            raise
        self._conn.execute("RELEASE part")

    def data_version(self) -> int:
        """A number that changes when another connection commits to the file (SQLite's
        ``PRAGMA data_version``): what this one read before may be stale."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()
