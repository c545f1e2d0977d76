"""``gpu-coordinator serve --db postgresql://...``: refused with ``bad_db`` when the database
cannot be the store (writing nothing), and, when it can, every (node, seq) kept once
across a kill -9 of the coordinator."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from support.coordinator_cli_hostile import Capsys
from support.coordinator_peer import Peer, connected
from support.postgres import PostgresCluster

from agent.protocol.messages import NodeStatusBody
from coordinator import cli, keys
from coordinator.store import Store


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {str(r[0]) for r in rows}


def _another_programs(cluster: PostgresCluster) -> str:
    url = cluster.create_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id BIGINT PRIMARY KEY, balance NUMERIC)")
    return url


#: Each database ``serve`` must refuse, made in the session's cluster or named beside it.
_UNUSABLE: dict[str, Callable[[PostgresCluster, Path], str]] = {
    "malformed": lambda c, d: "postgresql://me:s3cret@[::1/store?password=s3cret",
    "unreachable": lambda c, d: f"postgresql://postgres@/store?host={d}/no-server-here",
    "no-such-database": lambda c, d: f"postgresql://postgres:s3cret@/nope?host={c.socket_dir}",
    "bad-option": lambda c, d: f"postgresql://postgres@/store?sslmode=bogus&host={d}",
    "another-programs": lambda c, d: _another_programs(c),
}


@pytest.mark.parametrize("case", list(_UNUSABLE))
def test_serve_refuses_an_unusable_postgresql_store_and_writes_nothing(
    tmp_path: Path, capsys: Capsys, postgres_cluster: PostgresCluster, case: str
) -> None:
    db = _UNUSABLE[case](postgres_cluster, tmp_path)
    before = _tables(db) if case == "another-programs" else None
    argv = ["serve", "--port", "0", "--state-dir", str(tmp_path / "state"), "--db", db]
    returned = cli.main(argv)
    err = capsys.readouterr().err
    assert returned == cli.EXIT_USAGE, err
    assert err.startswith("gpu-coordinator: error [bad_db]: postgresql://"), err
    assert "Traceback" not in err
    assert "s3cret" not in err
    assert not (tmp_path / "state").exists()  # no key made
    if before is not None:
        assert _tables(db) == before == {"accounts"}  # no store table beside its own


async def _serve(url: str, state: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "coordinator.cli", "serve", "--port", "0"]
    command += ["--db", url, "--state-dir", str(state)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    listening = await asyncio.to_thread(process.stdout.readline)
    assert listening.startswith("listening on ws://"), listening
    process.url = listening.split()[-1]  # type: ignore[attr-defined]
    return process


def _stop(process: subprocess.Popen[str], how: signal.Signals) -> None:
    process.send_signal(how)
    process.wait(timeout=30)
    assert process.stdout is not None
    process.stdout.close()


async def test_serve_on_postgresql_keeps_each_seq_once_across_a_kill_9(
    tmp_path: Path, postgres_url: str
) -> None:
    peer = Peer()
    state = tmp_path / "state"
    first = await _serve(postgres_url, state)
    key = keys.load_or_create(state)
    pinned = {key.key_id: key.public_key}
    try:
        async with connected(first.url, pinned, peer) as link:  # type: ignore[attr-defined]
            assert link.welcome.body.last_agent_seq == 0
            for _ in range(3):
                await link.send(NodeStatusBody(available=True, units=[]))
    finally:
        _stop(first, signal.SIGKILL)
    second = await _serve(postgres_url, state)
    try:
        async with connected(second.url, pinned, peer) as link:  # type: ignore[attr-defined]
            assert link.welcome.body.last_agent_seq == 3
            peer.last_seq = 2  # a stale view: seq 3 is sent again, then 4
            await link.send(NodeStatusBody(available=False, units=[]))
            await link.send(NodeStatusBody(available=True, units=[]))
    finally:
        _stop(second, signal.SIGTERM)
    store = Store(postgres_url)
    try:
        assert store.nodes.all_seqs(peer.node_id) == [1, 2, 3, 4]
        latest = store.nodes.latest(peer.node_id, "node_status")
        assert latest is not None
        assert latest.body["available"] is True
    finally:
        store.close()
