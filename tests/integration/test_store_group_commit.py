"""Group commit: many messages to one transaction on the writer thread, none settled early
(on SQLite and on PostgreSQL: ``store_target``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.gateway import until

from agent.protocol.messages import Telemetry, decode_frame
from coordinator.db import Database, DbTarget
from coordinator.db_open import open_database
from coordinator.group_commit import GroupCommit
from coordinator.retention import Quotas
from coordinator.store import Message, Store

NODES = [f"node-{i:02d}" for i in range(50)]


@pytest.fixture
def store(store_target: DbTarget) -> Iterator[Store]:
    store = Store(store_target)
    for node in NODES:
        store.nodes.seen(node, "key", 1.0)
    yield store
    store.close()


def telemetry(node: str, seq: int) -> Message:
    return Message(node, seq, "telemetry", {"samples": [{"t": seq}]}, 2.0)


def stored(target: DbTarget) -> list[tuple[str, int]]:
    db = open_database(target)
    try:
        return [(str(n), int(s)) for n, s in db.execute("SELECT node_id, seq FROM messages")]
    finally:
        db.close()


def hold_every_node(db: Database) -> None:
    """Take what a writer needs, in ``db``'s transaction: SQLite's file (``BEGIN
    IMMEDIATE`` did), PostgreSQL's node rows."""
    db.execute("SELECT node_id FROM nodes" + db.for_update).fetchall()


async def test_no_message_is_settled_before_its_group_commits(
    store_target: DbTarget, store: Store
) -> None:
    writer = GroupCommit(store_target, Quotas())
    try:
        # Another writer holds the nodes: the group cannot commit, so nothing may settle.
        blocker = open_database(store_target)
        with blocker.transaction():
            hold_every_node(blocker)
            adds = [asyncio.ensure_future(writer.add(telemetry(n, 1))) for n in NODES]
            done, _ = await asyncio.wait(adds, timeout=0.3)
            assert done == set()
            assert stored(store_target) == []
        blocker.close()
        assert await asyncio.gather(*adds) == ["stored"] * len(NODES)
        # Settled only after the commit: every one is in the file.
        assert sorted(stored(store_target)) == [(n, 1) for n in NODES]
        assert writer.messages == len(NODES)
        assert writer.groups < len(NODES)  # grouped, not one commit each
    finally:
        writer.close()


async def test_a_failing_message_fails_alone_and_a_resend_is_a_duplicate(
    store_target: DbTarget, store: Store
) -> None:
    writer = GroupCommit(store_target, Quotas())
    try:
        unknown = writer.add(telemetry("node-unknown", 1))
        results = await asyncio.gather(
            writer.add(telemetry("node-00", 1)), unknown, return_exceptions=True
        )
        assert results[0] == "stored"
        assert isinstance(results[1], ValueError)
        assert await writer.add(telemetry("node-00", 1)) == "duplicate"
        assert await writer.add(telemetry("node-00", 2)) == "stored"
        assert sorted(stored(store_target)) == [("node-00", 1), ("node-00", 2)]
    finally:
        writer.close()


def test_a_group_with_failing_calls_commits_the_others_once_each(
    store_target: DbTarget, store: Store
) -> None:
    # The group goes first without a savepoint a call: its failures undo the try, and the
    # group goes again, each call alone; what the others store is stored once.
    def again(s: Store) -> None:  # the same (node, seq) row: the database refuses it
        s.nodes.insert_message("node-00", 1, "telemetry", "{}", 2.0)

    calls = [
        lambda s: s.add_in_transaction(telemetry("node-00", 1)),
        lambda s: s.add_in_transaction(telemetry("node-unknown", 1)),
        again,
        lambda s: s.add_in_transaction(telemetry("node-01", 1)),
    ]
    results = store.run_group(calls)
    assert results[0] == results[3] == "stored"
    assert isinstance(results[1], ValueError)
    assert isinstance(results[2], Exception)
    assert sorted(stored(store_target)) == [("node-00", 1), ("node-01", 1)]
    db = open_database(store_target)
    try:
        (size,) = db.execute(
            "SELECT length(CAST(body AS BLOB)) FROM messages WHERE node_id = 'node-00'"
        ).fetchone()
    finally:
        db.close()
    assert store.retention.stored_bytes("node-00") == size  # counted once
    assert store.run_group([lambda s: s.add_in_transaction(telemetry("node-00", 1))]) == [
        "duplicate"
    ]


def test_telemetry_is_stored_as_the_bytes_its_samples_came_in(
    store_target: DbTarget, store: Store
) -> None:
    body = '{"samples":[{"t":1.50,"g":[ 1 ]}],"dropped":0}'
    message = decode_frame('{"v":1,"type":"telemetry","seq":1,"body":' + body + "}")
    assert isinstance(message, Telemetry)
    assert store.add("node-00", 1, "telemetry", message.body, 2.0) == "stored"
    db = open_database(store_target)
    try:
        (text,) = db.execute("SELECT body FROM messages").fetchone()
    finally:
        db.close()
    assert text == body


async def test_the_loops_commits_leave_the_wal_to_the_writers_checkpoint(tmp_path: Path) -> None:
    # SQLite only: PostgreSQL's server checkpoints by itself.
    path = tmp_path / "coordinator.db"
    wal = path.with_name(path.name + "-wal")
    loop_store = Store(path, checkpoints=False)
    loop_store.nodes.seen("node-00", "key", 1.0)
    writer = GroupCommit(path, Quotas())
    try:
        before = path.stat().st_size
        # ~8 MB in 200 commits on the loop's connection: twice the WAL's 1,000 pages, past
        # which a connection that checkpoints copies the WAL into the file as it commits.
        for seq in range(1, 201):
            loop_store.add("node-00", seq, "telemetry", {"samples": ["x" * 40_000]}, 2.0)
        assert wal.stat().st_size > 8_000_000
        assert path.stat().st_size == before  # none of it copied by the loop
        # The writer's next commit finds the WAL past its pages, and copies it.
        assert await writer.add(telemetry("node-00", 201)) == "stored"
        assert path.stat().st_size > 8_000_000
    finally:
        writer.close()
        loop_store.close()


async def test_an_idle_writer_copies_the_loops_commits_into_the_file(tmp_path: Path) -> None:
    # No agent sends: without the writer's idle checkpoint the WAL would only grow.
    path = tmp_path / "coordinator.db"
    loop_store = Store(path, checkpoints=False)
    loop_store.nodes.seen("node-00", "key", 1.0)
    writer = GroupCommit(path, Quotas(), idle_checkpoint_s=0.05)
    try:
        before = path.stat().st_size
        for seq in range(1, 21):
            loop_store.add("node-00", seq, "telemetry", {"samples": ["x" * 40_000]}, 2.0)
        await until(lambda: path.stat().st_size >= before + 800_000, "the idle checkpoint")
        assert loop_store.nodes.all_seqs("node-00") == list(range(1, 21))
    finally:
        writer.close()
        loop_store.close()
