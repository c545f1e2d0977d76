"""Open the store's database, a SQLite file or a PostgreSQL URL (:mod:`coordinator.db`)."""

from __future__ import annotations

from pathlib import Path

from coordinator.db import Database, DbTarget, SqliteDatabase

__all__ = ["open_database"]


def open_database(target: DbTarget) -> Database:
    """A connection to the store at ``target``: a SQLite file, or a PostgreSQL URL."""
    if isinstance(target, Path):
        return SqliteDatabase(target)
    from coordinator.db_postgres import PostgresDatabase  # psycopg: the postgres extra

    return PostgresDatabase(target)
