"""An upload to the coordinator's artifact store survives the coordinator restarting.

The node's PUTs meet a refused connection while the coordinator is down; once it is up
again on the same (fixed) artifact port, the retried PUT lands. Ports from free_port, so
that tests run side by side.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import httpx
from support.coordinator_peer import Peer, connected
from support.processes import free_port

from agent.jobs.uploader import RetryPolicy, put_file
from agent.protocol.messages import JobOffer
from coordinator.server import Coordinator, Settings

DATA = b"made before the restart\n" * 100
SPEC = {
    "image": "registry.example/app@sha256:" + "a" * 64,
    "command": ["true"],
    "outputs": ["result.txt"],
}


async def test_an_upload_retried_across_a_coordinator_restart_lands_on_the_same_port(
    tmp_path: Path,
) -> None:
    port, artifacts_port = free_port(), free_port()

    def coordinator() -> Coordinator:
        return Coordinator(
            db_path=tmp_path / "coordinator.db",
            state_dir=tmp_path / "state",
            settings=Settings(handshake_timeout_s=5.0),
            port=port,
            artifacts_port=artifacts_port,
        )

    first = coordinator()
    peer = Peer()
    async with first:
        pinned = {first.key.key_id: first.key.public_key}
        async with connected(first.url, pinned, peer) as link:
            await first.submit(peer.node_id, SPEC)
            offer = link.verify(await link.take(JobOffer), pinned)
    # Down now: the node's PUTs are refused until it is back.
    spool = tmp_path / "result.txt"
    spool.write_bytes(DATA)
    refused = asyncio.Event()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 12:  # past the 10 attempts an upload once had in all
            refused.set()
        await asyncio.sleep(seconds)

    async with httpx.AsyncClient() as client:
        upload = asyncio.create_task(
            put_file(
                client,
                spool,
                offer.uploads["result.txt"],
                size=len(DATA),
                sha256=hashlib.sha256(DATA).hexdigest(),
                policy=RetryPolicy(base_s=0.01, max_s=0.05, timeout_s=10),
                deadline=offer.expires_at + 86400,
                sleep=sleep,
            )
        )
        upload.add_done_callback(lambda _: refused.set())  # an upload that gave up
        try:
            async with asyncio.timeout(60):
                await refused.wait()
            assert not upload.done(), upload  # still retrying, not failed, not done
            async with coordinator() as second:
                async with asyncio.timeout(60):
                    await upload
                assert second.artifacts is not None
                stored = second.artifacts.outputs(offer.job_id)["result.txt"]
        finally:
            upload.cancel()
    assert stored.sha256 == hashlib.sha256(DATA).hexdigest()


async def test_offers_name_the_artifacts_url_given_and_a_put_there_lands(tmp_path: Path) -> None:
    artifacts_port = free_port()
    server = Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "state",
        artifacts_port=artifacts_port,
        # The name nodes know the coordinator by, not the address it listens on.
        artifacts_url=f"http://localhost:{artifacts_port}",
    )
    peer = Peer()
    async with server:
        pinned = {server.key.key_id: server.key.public_key}
        async with connected(server.url, pinned, peer) as link:
            await server.submit(peer.node_id, SPEC)
            offer = link.verify(await link.take(JobOffer), pinned)
        url = offer.uploads["result.txt"].url
        assert url.startswith(f"http://localhost:{artifacts_port}/artifacts/{offer.job_id}?")
        async with httpx.AsyncClient() as client:
            assert (await client.put(url, content=DATA)).status_code == 201
