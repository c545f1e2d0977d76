"""Open the store's database, a SQLite file or a PostgreSQL URL (:mod:`coordinator.db`)."""

from __future__ import annotations

from pathlib import Path

from coordinator.db import Database, DbTarget, SqliteDatabase

__all__ = ["open_database"]


def open_database(target: DbTarget, *, checkpoints: bool = True) -> Database:
    """A connection to the store at ``target``: a SQLite file, or a PostgreSQL URL.

    ``checkpoints=False``: a SQLite connection that leaves copying the WAL into the file to
    another connection (:class:`SqliteDatabase`); PostgreSQL's server checkpoints itself.
    """
    if isinstance(target, Path):
        return SqliteDatabase(target, checkpoints=checkpoints)
    from coordinator.db_postgres import PostgresDatabase  # psycopg: the postgres extra

    return PostgresDatabase(target)
