"""Several coordinators on one PostgreSQL: a job offered through one reaches the node
through the other, a newer session on one closes the older on the other, and agents of one
killed -9 resume on the other with nothing lost and nothing stored twice."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support.coordinator_peer import Peer, PeerLink, connected
from support.job_service import jobs_in
from websockets.exceptions import ConnectionClosed

from agent.protocol.messages import (
    COORDINATOR_SENDS,
    Error,
    JobCancel,
    JobOffer,
    NodeStatusBody,
    decode_frame,
)
from coordinator import keys
from coordinator.server import Coordinator, Settings
from coordinator.store import Store

SPEC: dict[str, Any] = {"image": "busybox@sha256:" + "a" * 64, "command": ["echo", "hi"]}


def _status(seq: int) -> NodeStatusBody:
    """The body an agent sends as ``seq``: the same again when it resends it."""
    return NodeStatusBody(available=seq % 2 == 0, units=[], detail=f"message {seq}")


@asynccontextmanager
async def two_coordinators(url: str, tmp_path: Path) -> AsyncIterator[list[Coordinator]]:
    """Two coordinators on the database at ``url``, with one signing key."""
    keys.load_or_create(tmp_path / "a")
    (tmp_path / "b").mkdir(mode=0o700)
    shutil.copy2(tmp_path / "a" / keys.KEY_FILE, tmp_path / "b" / keys.KEY_FILE)
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(Coordinator(db_path=url, state_dir=tmp_path / name))
            for name in ("a", "b")
        ]


def _pinned(coordinator: Coordinator) -> dict[str, bytes]:
    return {coordinator.key.key_id: coordinator.key.public_key}


async def test_a_job_offered_through_one_coordinator_reaches_the_node_on_the_other(
    postgres_url: str, tmp_path: Path
) -> None:
    async with two_coordinators(postgres_url, tmp_path) as (a, b):
        peer = Peer()
        async with connected(b.url, _pinned(b), peer) as link:
            await link.send(_status(1))
            job_id = await a.submit(peer.node_id, SPEC)
            offer = await link.take(JobOffer)
            assert link.verify(offer, _pinned(a)).job_id == job_id
            await a.cancel(job_id, "changed my mind")
            cancel = await link.take(JobCancel)
            assert (cancel.body.job_id, cancel.body.reason) == (job_id, "changed my mind")
            # One stream, numbered by the store: attest_request 1, the offer, the cancel.
            assert [m.seq for m in peer.stored] == [1, 2, 3]
            assert a.connected() == set()
            assert b.connected() == {peer.node_id}


async def test_a_newer_session_on_another_coordinator_closes_the_older(
    postgres_url: str, tmp_path: Path
) -> None:
    async with two_coordinators(postgres_url, tmp_path) as (a, b):
        peer = Peer()
        async with connected(a.url, _pinned(a), peer) as old:
            await old.send(_status(1))
            async with connected(b.url, _pinned(b), peer) as new:
                assert new.welcome.body.last_agent_seq == 1
                # The older session hears it was superseded, and is closed.
                error = await _until_closed(old)
                assert error is not None
                assert error.body.code == "superseded"
                await new.send(_status(2))
                assert a.connected() == set()
                assert b.connected() == {peer.node_id}
        store = Store(postgres_url)
        try:
            assert store.nodes.all_seqs(peer.node_id) == [1, 2]
        finally:
            store.close()


async def test_one_coordinator_places_a_deployments_replicas_on_every_coordinators_nodes(
    postgres_url: str, tmp_path: Path
) -> None:
    service = {"port": 8080, "models": ["tiny"], "lease_s": 60}
    spec = SPEC | {"kind": "service", "service": service}
    async with two_coordinators(postgres_url, tmp_path) as (a, b):
        peer = Peer()
        async with connected(b.url, _pinned(b), peer) as link:
            await link.send(NodeStatusBody(available=True, units=[]))
            await b.deployments.deploy("web", spec, 1)
            for _ in range(3):  # both reconcilers pass; only the lead's places
                await b.deployments.tick()
                await a.deployments.tick()
            offer = await link.take(JobOffer)
            replicas = a.store.deployments.replicas("web")
            assert [(r.job_id, r.node_id) for r in replicas] == [(offer.body.job_id, peer.node_id)]
            assert (a.deployments.passes > 0, b.deployments.passes) == (True, 0)
            assert a.store.deployments.replicas("web", retired=True) == []


async def _until_closed(link: PeerLink) -> Error | None:
    """Read the link to its close; the last ``error`` it got, if any."""
    last: Error | None = None
    try:
        while True:
            async with asyncio.timeout(10):
                message = decode_frame(await link.ws.recv(), accept=COORDINATOR_SENDS)
            if isinstance(message, Error):
                last = message
    except ConnectionClosed:
        return last


class _Gateway:
    """``gpu-coordinator serve`` in its own process (so that it can be killed -9)."""

    def __init__(self, url: str, state: Path) -> None:
        command = [sys.executable, "-m", "coordinator.cli", "serve", "--port", "0"]
        command += ["--db", url, "--state-dir", str(state)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.url = ""

    async def started(self) -> _Gateway:
        assert self.process.stdout is not None
        line = await asyncio.to_thread(self.process.stdout.readline)
        assert line.startswith("listening on ws://"), line
        self.url = line.split()[-1]
        return self

    def stop(self, how: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(how)
        self.process.wait(timeout=30)
        assert self.process.stdout is not None
        self.process.stdout.close()


async def _agent(
    peer: Peer,
    gateways: list[_Gateway],
    pinned: dict[str, bytes],
    last: int,
    sent: asyncio.Queue[int],
) -> int:
    """Send seqs 1..``last`` as an agent does: each until it is acknowledged, through the
    first gateway that takes the connection, resending after a reconnect what was not
    acknowledged to it. Returns how many times it connected."""
    acked = connections = 0
    while acked < last:
        for gateway in gateways:
            try:
                async with connected(gateway.url, pinned, peer) as link:
                    connections += 1
                    peer.last_seq = acked  # resent from here: some may be duplicates
                    while acked < last:
                        acked = await link.send(_status(acked + 1))
                        sent.put_nowait(acked)
            except (ConnectionClosed, OSError, TimeoutError):
                continue
            break
    return connections


async def test_agents_of_a_coordinator_killed_9_resume_on_the_other_losing_nothing(
    postgres_url: str, tmp_path: Path
) -> None:
    keys.load_or_create(tmp_path / "a")
    (tmp_path / "b").mkdir(mode=0o700)
    shutil.copy2(tmp_path / "a" / keys.KEY_FILE, tmp_path / "b" / keys.KEY_FILE)
    key = keys.load_or_create(tmp_path / "a")
    pinned = {key.key_id: key.public_key}
    a = await _Gateway(postgres_url, tmp_path / "a").started()
    b = _Gateway(postgres_url, tmp_path / "b")
    try:
        await b.started()
        peers = [Peer() for _ in range(6)]
        last, sent = 60, asyncio.Queue[int]()
        agents = [
            asyncio.create_task(_agent(peer, [a, b] if i % 2 else [b, a], pinned, last, sent))
            for i, peer in enumerate(peers)
        ]
        try:
            async with asyncio.timeout(60):
                for _ in range(len(peers) * 10):  # the agents well into their streams
                    await sent.get()
                a.stop(signal.SIGKILL)
                connections = await asyncio.gather(*agents)
        finally:
            for agent in agents:
                agent.cancel()
            await asyncio.gather(*agents, return_exceptions=True)
        assert connections == [1, 2] * 3  # a's agents moved to b, b's stayed
    finally:
        a.stop(signal.SIGKILL)
        b.stop(signal.SIGTERM)
    store = Store(postgres_url)
    try:
        for peer in peers:  # each seq once: as many rows as the last seq, no gap
            assert store.nodes.all_seqs(peer.node_id) == list(range(1, last + 1))
            stored = store.nodes.messages(peer.node_id, "node_status", limit=last)
            assert [m.body["detail"] for m in stored] == [
                f"message {s}" for s in range(1, last + 1)
            ]
    finally:
        store.close()


async def test_a_job_another_coordinator_stored_is_live_here_at_once(
    postgres_url: str, tmp_path: Path
) -> None:
    # The gateway asks at every request which jobs may serve; another coordinator's
    # writes are not this connection's, and must not be hidden by what it read before.
    here = Store(postgres_url)
    try:
        with jobs_in(tmp_path, postgres_url) as there:
            there.seen()
            assert here.services.live() == []
            job_id = await there.service.submit(there.peer.node_id, SPEC)
            assert [row.job_id for row in here.services.live()] == [job_id]
    finally:
        here.close()


def test_a_connection_the_server_dropped_is_made_again_at_the_next_call(
    postgres_url: str,
) -> None:
    store = Store(postgres_url)
    try:
        store.nodes.seen("node-aa", "key", 1.0)
        assert store.presence.lead()
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        with pytest.raises(psycopg.OperationalError):
            store.nodes.all()  # the call that meets the drop fails (nothing is retried)
        assert [n.node_id for n in store.nodes.all()] == ["node-aa"]
        assert store.presence.lead()  # taken again on the new connection
    finally:
        store.close()


async def test_only_the_coordinator_that_leads_runs_the_stores_retention(
    postgres_url: str, tmp_path: Path
) -> None:
    holder = Store(postgres_url)  # another coordinator's connection, leading
    try:
        assert holder.presence.lead()
        holder.nodes.seen("node-aa", "key", 1.0)
        holder.add("node-aa", 1, "telemetry", {"samples": []}, 1.0)  # long past its keep
        settings = Settings(retention_interval_s=0.05)
        async with Coordinator(
            db_path=postgres_url, state_dir=tmp_path / "s", settings=settings
        ) as follower:
            for _ in range(2):
                async with asyncio.timeout(10):
                    await follower.retained.wait()
                follower.retained.clear()
            assert holder.nodes.all_seqs("node-aa") == [1]  # the lead's work, not its
            holder.close()  # the lead goes: the lock with its connection
            for _ in range(2):
                async with asyncio.timeout(10):
                    await follower.retained.wait()
                follower.retained.clear()
            assert follower.store.nodes.all_seqs("node-aa") == []
    finally:
        holder.close()
