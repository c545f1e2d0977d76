"""Group commit: many messages to one transaction on the writer thread, none settled early."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol.messages import Telemetry, decode_frame
from coordinator.group_commit import GroupCommit
from coordinator.retention import Quotas
from coordinator.store import Message, Store

NODES = [f"node-{i:02d}" for i in range(50)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "c.db")
    for node in NODES:
        store.nodes.seen(node, "key", 1.0)
    yield store
    store.close()


def telemetry(node: str, seq: int) -> Message:
    return Message(node, seq, "telemetry", {"samples": [{"t": seq}]}, 2.0)


def stored(path: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(path)
    try:
        return [(str(n), int(s)) for n, s in db.execute("SELECT node_id, seq FROM messages")]
    finally:
        db.close()


async def test_no_message_is_settled_before_its_group_commits(tmp_path: Path, store: Store) -> None:
    writer = GroupCommit(tmp_path / "c.db", Quotas())
    try:
        # Another writer holds the file: the group cannot commit, so nothing may settle.
        blocker = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        adds = [asyncio.ensure_future(writer.add(telemetry(n, 1))) for n in NODES]
        done, _ = await asyncio.wait(adds, timeout=0.3)
        assert done == set()
        assert stored(tmp_path / "c.db") == []
        blocker.execute("COMMIT")
        blocker.close()
        assert await asyncio.gather(*adds) == ["stored"] * len(NODES)
        # Settled only after the commit: every one is in the file.
        assert sorted(stored(tmp_path / "c.db")) == [(n, 1) for n in NODES]
        assert writer.messages == len(NODES)
        assert writer.groups < len(NODES)  # grouped, not one commit each
    finally:
        writer.close()


async def test_a_failing_message_fails_alone_and_a_resend_is_a_duplicate(
    tmp_path: Path, store: Store
) -> None:
    writer = GroupCommit(tmp_path / "c.db", Quotas())
    try:
        unknown = writer.add(telemetry("node-unknown", 1))
        results = await asyncio.gather(
            writer.add(telemetry("node-00", 1)), unknown, return_exceptions=True
        )
        assert results[0] == "stored"
        assert isinstance(results[1], ValueError)
        assert await writer.add(telemetry("node-00", 1)) == "duplicate"
        assert await writer.add(telemetry("node-00", 2)) == "stored"
        assert sorted(stored(tmp_path / "c.db")) == [("node-00", 1), ("node-00", 2)]
    finally:
        writer.close()


def test_telemetry_is_stored_as_the_bytes_its_samples_came_in(tmp_path: Path, store: Store) -> None:
    body = '{"samples":[{"t":1.50,"g":[ 1 ]}],"dropped":0}'
    message = decode_frame('{"v":1,"type":"telemetry","seq":1,"body":' + body + "}")
    assert isinstance(message, Telemetry)
    assert store.add("node-00", 1, "telemetry", message.body, 2.0) == "stored"
    db = sqlite3.connect(tmp_path / "c.db")
    try:
        (text,) = db.execute("SELECT body FROM messages").fetchone()
    finally:
        db.close()
    assert text == body
