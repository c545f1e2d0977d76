"""Junk API keys cost the gateway no lookup each: a key's table against a real SQLite
store, its statements counted."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from coordinator.db import SqliteDatabase
from coordinator.gateway.tables import MAX_UNKNOWN, UNKNOWN_FOR_S, ApiKeyTable
from coordinator.store import Store


class _Counted(SqliteDatabase):
    """The store's file, each statement run counted."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.statements = 0

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        self.statements += 1
        return super().execute(sql, args)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _table(tmp_path: Path) -> tuple[ApiKeyTable, _Counted, _Clock]:
    Store(tmp_path / "c.db").close()  # the schema
    db, clock = _Counted(tmp_path / "c.db"), _Clock()
    return ApiKeyTable(db, clock=clock), db, clock


def _junk() -> str:
    return "gpk-" + secrets.token_urlsafe(32)


def test_a_text_not_shaped_as_a_key_is_refused_unread(tmp_path: Path) -> None:
    table, db, _ = _table(tmp_path)
    try:
        for text in ("sk-proj-abc", "x", "gpk-" + "a" * 42, "gpk-" + "a" * 44, "gpk-" + "é" * 43):
            assert table.find(text) is None
        assert db.statements == 0
    finally:
        db.close()


def test_an_unknown_key_is_read_once_then_refused_unread_for_a_while(tmp_path: Path) -> None:
    table, db, clock = _table(tmp_path)
    try:
        junk = _junk()
        assert [table.find(junk) for _ in range(1000)] == [None] * 1000
        assert db.statements == 1
        clock.now += UNKNOWN_FOR_S
        assert table.find(junk) is None
        assert db.statements == 2  # read again once its time is up
        # A key made since is found at once: nobody could send its text before.
        key, text = table.create("alice", 60, 1.0)
        assert table.find(text) == key
    finally:
        db.close()


def test_the_unknown_keys_remembered_are_bounded(tmp_path: Path) -> None:
    table, db, _ = _table(tmp_path)
    try:
        first = _junk()
        table.find(first)
        for _ in range(MAX_UNKNOWN):
            table.find(_junk())
        before = db.statements
        table.find(first)  # the oldest went: read again
        assert db.statements == before + 1
    finally:
        db.close()
