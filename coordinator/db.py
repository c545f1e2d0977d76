"""The coordinator's database connection, and its transactions: what every table shares.

One interface, :class:`Database`, with two implementations: :class:`SqliteDatabase` (a
file, the embedded default) and :class:`coordinator.db_postgres.PostgresDatabase` (a
``postgresql://`` URL: several coordinators on one server);
:func:`coordinator.db_open.open_database` opens either. The tables write their SQL
once, in SQLite's dialect with ``?`` placeholders; what PostgreSQL needs otherwise is
translated by its implementation, once per statement.

Each write commits before it returns (autocommit, :meth:`Database.transaction` for the
writes that go together), so the caller may acknowledge what a call stored as soon as it
returns.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeAlias

__all__ = [
    "JSONB",
    "URL_SCHEMES",
    "Cursor",
    "Database",
    "DbTarget",
    "SqliteDatabase",
    "describe",
    "driver_errors",
    "redact",
]

#: Where a store is: a SQLite file, or (a ``str``) a PostgreSQL URL.
DbTarget: TypeAlias = Path | str
#: The URL schemes libpq takes for a server.
URL_SCHEMES = ("postgresql", "postgres")
_USERINFO_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_OPTION_PASSWORD = re.compile(r"(password\s*=\s*)[^&\s\"']*", re.IGNORECASE)
#: A stored JSON text column as jsonb: an escaped NUL (``\u0000``, which msgspec passes and
#: jsonb refuses) becomes U+FFFD first. Still JSON: an escape becomes another one, and
#: after an escaped backslash it was text and stays text.
JSONB: Final = "replace({}, '\\u0000', '\\ufffd')::jsonb"


class Cursor(Protocol):
    """What a statement returns: sqlite3's and psycopg's cursors both are one."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Database(ABC):
    """One connection to the store, used from one thread (the event loop's, or the
    group-commit writer's: :mod:`coordinator.group_commit`)."""

    dialect: Literal["sqlite", "postgres"]
    for_update: str
    """What makes a SELECT lock the rows it reads until the transaction ends ("" where
    the transaction holds the whole database already, as SQLite's ``BEGIN IMMEDIATE``)."""
    rollbacks: int
    """How many transactions rolled back: what was read before one may be undone."""

    @abstractmethod
    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> Cursor:
        """Run one statement."""

    @abstractmethod
    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Run one statement for each row."""

    @property
    @abstractmethod
    def changes(self) -> int:
        """A number that stays the same only while nothing read before can have changed."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """Commit what the block writes together, or none of it."""

    @abstractmethod
    def savepoint(self) -> AbstractContextManager[None]:
        """Within a transaction: keep what the block writes, or undo only that."""

    @abstractmethod
    def notify(self, channel: str, payload: str) -> None:
        """Tell the other coordinators on the database ``payload`` on ``channel``, at the
        commit of the transaction (at once outside one)."""

    @abstractmethod
    def data_version(self) -> int:
        """A number that changes when another connection may have committed: what this one
        read before may be stale."""

    @abstractmethod
    def schema_version(self) -> int:
        """The version of the store's schema (0: none yet)."""

    @abstractmethod
    def create_schema(self, script: str, version: int, *, upgrade: str = "") -> None:
        """Run the schema ``script`` (SQLite's dialect; every statement ``IF NOT EXISTS``),
        then ``upgrade``, and record ``version``, unless a version as new is there already."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""


class SqliteDatabase(Database):
    """A connection to the store's file."""

    dialect = "sqlite"
    for_update = ""

    def __init__(self, path: Path, *, checkpoints: bool = True) -> None:
        """Open the file at ``path``; ``checkpoints=False``: this connection never copies
        the WAL into the file (another connection to it does)."""
        # The store holds credentials (registry logins, upload URLs): a new file is its
        # owner's only, and SQLite gives its -wal and -shm the file's mode.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        # Two connections write the file (this one and the group-commit writer's): one
        # waits for the other's transaction, up to the timeout.
        self._conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        self.rollbacks = 0
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            if not checkpoints:
                # The commit that takes the WAL past its 1,000 pages copies them into the
                # file: on the event loop's connection that stalls every session meanwhile.
                # The group-commit writer's connection commits often and does it instead.
                self._conn.execute("PRAGMA wal_autocheckpoint=0")
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
        """Rows this connection changed since it opened."""
        return self._conn.total_changes

    def function(self, name: str, arity: int, func: Callable[..., Any]) -> None:
        """Make ``func`` an SQL function of this connection (deterministic)."""
        self._conn.create_function(name, arity, func, deterministic=True)

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Run one statement for each row."""
        self._conn.executemany(sql, rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Commit what the block writes together, or none of it (the file's one writer
        meanwhile: ``BEGIN IMMEDIATE``)."""
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

    def notify(self, channel: str, payload: str) -> None:
        """Nothing: a SQLite file has one coordinator, which holds every session itself."""

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: it changes when another connection commits."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def schema_version(self) -> int:
        """``PRAGMA user_version``."""
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def create_schema(self, script: str, version: int, *, upgrade: str = "") -> None:
        """Run ``script`` and ``upgrade``, and set ``PRAGMA user_version``."""
        self._conn.executescript(script)
        if upgrade:
            self._conn.executescript(upgrade)
        self._conn.execute(f"PRAGMA user_version={int(version)}")

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def describe(target: DbTarget) -> str:
    """``target`` as it may be shown or logged: a URL without its password."""
    return str(target) if isinstance(target, Path) else redact(target)


def redact(text: str) -> str:
    """``text`` (a URL, or a message quoting one) with every password in it starred: the
    one after the user name, and a ``password=`` option."""
    text = _USERINFO_PASSWORD.sub(r"\1***@", text)
    return _OPTION_PASSWORD.sub(r"\1***", text)


@cache
def driver_errors() -> tuple[type[Exception], ...]:
    """The base error of each database driver there is: sqlite3's, and psycopg's when it is
    installed (the ``postgres`` extra)."""
    try:
        import psycopg
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)
