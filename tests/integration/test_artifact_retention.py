"""Retention of the coordinator's artifact store: outputs go some days after their job ended.

A real coordinator on 127.0.0.1 with a fake clock, real SQLite, real files; the test node
of tests/support/coordinator_peer.py; PUTs and GETs through httpx.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from support.coordinator_peer import Peer, PeerLink, connected

from agent.protocol.jobs import Offer
from agent.protocol.messages import JobOffer
from coordinator.artifact_tokens import sign_token
from coordinator.server import Coordinator, Settings

DAY = 86400.0
SPEC: dict[str, Any] = {
    "image": "registry.example/app@sha256:" + "a" * 64,
    "command": ["true"],
    "outputs": ["result.txt"],
    "output_max_bytes": 1000,
}
SHARED = b"the same result in two jobs\n"


class Clock:
    """The coordinator's time, moved by the test."""

    def __init__(self) -> None:
        self.now = time.time()  # offers made now verify as the node checks them

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def coordinator(tmp_path: Path, clock: Clock) -> AsyncIterator[Coordinator]:
    server = Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "state",
        # No pass of its own: the test runs each one.
        settings=Settings(artifacts_keep_s=7 * DAY, retention_interval_s=0),
        clock=clock,
    )
    async with server:
        yield server


async def _offer(coordinator: Coordinator, link: PeerLink) -> Offer:
    pinned = {coordinator.key.key_id: coordinator.key.public_key}
    await coordinator.submit(link.peer.node_id, SPEC)
    return link.verify(await link.take(JobOffer), pinned)


async def _put(url: str, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.put(url, content=body)


async def _get(coordinator: Coordinator, where: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(coordinator.admin_url + where)


def _blobs(coordinator: Coordinator) -> set[str]:
    return {p.name for p in (coordinator.state_dir / "artifacts" / "sha256").iterdir()}


async def test_outputs_go_once_their_job_ended_past_the_retention_and_a_shared_blob_last(
    coordinator: Coordinator, clock: Clock
) -> None:
    peer = Peer()
    pinned = {coordinator.key.key_id: coordinator.key.public_key}
    digest = hashlib.sha256(SHARED).hexdigest()
    async with connected(coordinator.url, pinned, peer) as link:
        first, second, running = [await _offer(coordinator, link) for _ in range(3)]
        for offer in (first, second):
            assert (await _put(offer.uploads["result.txt"].url, SHARED)).status_code == 201
        assert (await _put(running.uploads["result.txt"].url, b"mine")).status_code == 201
        await link.status(first.job_id, "completed")
        clock.now += 3 * DAY
        await link.status(second.job_id, "completed")
        await link.status(running.job_id, "uploading")

        clock.now += 5 * DAY  # first ended 8 days ago, second 5: only first's rows go
        assert coordinator.expire_outputs().outputs == 1
        gone = await _get(coordinator, f"/api/jobs/{first.job_id}/outputs/result.txt")
        assert (gone.status_code, gone.json()["error"]["code"]) == (410, "output_expired")
        kept = await _get(coordinator, f"/api/jobs/{second.job_id}/outputs/result.txt")
        assert (kept.status_code, kept.content) == (200, SHARED)
        assert digest in _blobs(coordinator)  # second's row still needs the shared object
        job = (await _get(coordinator, f"/api/jobs/{first.job_id}")).json()
        assert job["outputs"] == []
        assert job["outputs_expired"] == [{"path": "result.txt", "expired": clock.now}]
        assert job["output_problems"] == []  # expired, not missing

        clock.now += 30 * DAY
        assert coordinator.expire_outputs().outputs == 1  # second's; never the running one
        assert _blobs(coordinator) == {hashlib.sha256(b"mine").hexdigest()}
        gone = await _get(coordinator, f"/api/jobs/{second.job_id}/outputs/result.txt")
        assert (gone.status_code, gone.json()["error"]["code"]) == (410, "output_expired")
        never = await _get(coordinator, f"/api/jobs/{second.job_id}/outputs/other.txt")
        assert (never.status_code, never.json()["error"]["code"]) == (404, "output_missing")

        # A PUT with a token still valid does not bring an expired output back.
        secret = (coordinator.state_dir / "artifacts.key").read_bytes()
        token = sign_token(secret, first.job_id, "result.txt", int(clock.now) + 60)
        url = f"{coordinator.artifacts_url}/artifacts/{first.job_id}?path=result.txt&token={token}"
        again = await _put(url, SHARED)
        assert (again.status_code, again.json()["error"]["code"]) == (410, "output_expired")
        assert coordinator.artifacts is not None
        assert coordinator.artifacts.outputs(first.job_id) == {}


async def test_what_a_crash_mid_pass_or_mid_put_left_is_removed_by_the_next_pass(
    coordinator: Coordinator, clock: Clock
) -> None:
    peer = Peer()
    pinned = {coordinator.key.key_id: coordinator.key.public_key}
    root = coordinator.state_dir / "artifacts"
    async with connected(coordinator.url, pinned, peer) as link:
        done, live = [await _offer(coordinator, link) for _ in range(2)]
        assert (await _put(done.uploads["result.txt"].url, b"done")).status_code == 201
        assert (await _put(live.uploads["result.txt"].url, b"live")).status_code == 201
    # A pass killed between its commit and its unlinks: the row is expired, the object is
    # still there. A PUT killed between its rename and its row: an object nobody names.
    # A PUT killed while receiving: a temporary file.
    with sqlite3.connect(root / "index.db") as index:
        index.execute("UPDATE artifacts SET expired = ? WHERE job_id = ?", (clock.now, done.job_id))
    index.close()
    orphan = root / "sha256" / hashlib.sha256(b"orphan").hexdigest()
    orphan.write_bytes(b"orphan")
    (root / "tmp" / ("0" * 32)).write_bytes(b"half a body")

    retained = coordinator.expire_outputs()
    assert retained.outputs == 0  # nothing ended: only files went
    assert retained.files == 3
    assert _blobs(coordinator) == {hashlib.sha256(b"live").hexdigest()}
    assert list((root / "tmp").iterdir()) == []
    got = await _get(coordinator, f"/api/jobs/{live.job_id}/outputs/result.txt")
    assert (got.status_code, got.content) == (200, b"live")


async def test_a_pass_during_a_put_leaves_its_temporary_file_and_the_put_lands(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    pinned = {coordinator.key.key_id: coordinator.key.public_key}
    async with connected(coordinator.url, pinned, peer) as link:
        offer = await _offer(coordinator, link)
    parts = urlsplit(offer.uploads["result.txt"].url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(
        f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: x\r\n"
        "Content-Length: 10\r\n\r\n01234".encode()
    )
    await writer.drain()
    tmp = coordinator.state_dir / "artifacts" / "tmp"
    async with asyncio.timeout(30):
        while not any(tmp.iterdir()):  # the coordinator has begun writing the body
            await asyncio.sleep(0.01)
    assert coordinator.expire_outputs().files == 0
    writer.write(b"56789")
    writer.write_eof()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 201 "), answer
    assert coordinator.artifacts is not None
    assert coordinator.artifacts.outputs(offer.job_id)["result.txt"].size_bytes == 10


async def test_the_periodic_pass_expires_outputs_and_a_restart_keeps_them_expired(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    def started(interval_s: float) -> Coordinator:
        settings = Settings(artifacts_keep_s=DAY, retention_interval_s=interval_s)
        # A telemetry pass that fails (as tests/integration/test_coordinator_review.py forces
        # one to): the outputs pass runs all the same.
        object.__setattr__(settings, "telemetry_keep_rows", 10**20)
        return Coordinator(
            db_path=tmp_path / "coordinator.db",
            state_dir=tmp_path / "state",
            settings=settings,
            clock=clock,
        )

    peer = Peer()
    async with started(0) as first:
        pinned = {first.key.key_id: first.key.public_key}
        async with connected(first.url, pinned, peer) as link:
            offer = await _offer(first, link)
            assert (await _put(offer.uploads["result.txt"].url, SHARED)).status_code == 201
            await link.status(offer.job_id, "completed")
    clock.now += 2 * DAY
    where = f"/api/jobs/{offer.job_id}/outputs/result.txt"
    with caplog.at_level(logging.ERROR, logger="coordinator"):
        async with started(3600) as second:  # a pass at start, the next an hour on
            async with asyncio.timeout(30):
                await second.retained.wait()
            gone = await _get(second, where)
            assert (gone.status_code, gone.json()["error"]["code"]) == (410, "output_expired")
            assert _blobs(second) == set()
    assert [r.getMessage() for r in caplog.records] == [
        "retention: the pass failed (telemetry); next in 3600s"
    ]
    async with started(0) as third:
        gone = await _get(third, where)
        assert (gone.status_code, gone.json()["error"]["code"]) == (410, "output_expired")


@pytest.mark.parametrize(
    ("budget", "kept"),
    [
        (200, [False, True, True, True]),  # the oldest job's going is enough
        # The 2nd job's going frees nothing (the 3rd shares its object), so the 3rd goes
        # too; the running job's outputs never go.
        (150, [False, False, False, True]),
    ],
)
async def test_over_the_byte_budget_the_outputs_of_the_jobs_that_ended_first_go(
    tmp_path: Path, clock: Clock, budget: int, kept: list[bool]
) -> None:
    server = Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "state",
        settings=Settings(artifacts_max_bytes=budget, retention_interval_s=0),
        clock=clock,
    )
    peer = Peer()
    bodies = [b"a" * 100, b"b" * 100, b"b" * 100, b"d" * 100]  # the 2nd and 3rd share one
    async with (
        server,
        connected(server.url, {server.key.key_id: server.key.public_key}, peer) as link,
    ):
        jobs = [await _offer(server, link) for _ in bodies]
        for offer, body in zip(jobs, bodies, strict=True):
            assert (await _put(offer.uploads["result.txt"].url, body)).status_code == 201
        for offer in jobs[:3]:  # the last one still runs
            await link.status(offer.job_id, "completed")
            clock.now += 60
        # 300 bytes on disk, none ended a week ago: the oldest go until the budget holds.
        assert server.expire_outputs().outputs == kept.count(False)
        assert server.artifacts is not None
        assert [bool(server.artifacts.outputs(o.job_id)) for o in jobs] == kept
        left = {body for body, still in zip(bodies, kept, strict=True) if still}
        assert _blobs(server) == {hashlib.sha256(body).hexdigest() for body in left}
