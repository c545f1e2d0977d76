"""The coordinator's artifact store: what a node may PUT there, and what it refuses.

A real coordinator on 127.0.0.1 and a test node (tests/coordinator_peer.py); the PUTs go
through httpx, as the agent's uploader sends them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from support.coordinator_peer import Peer, connected, signed_receipt

from agent.protocol.jobs import Offer
from agent.protocol.messages import JobOffer
from coordinator.artifact_tokens import sign_token
from coordinator.errors import JobError
from coordinator.server import Coordinator, Settings

PINNED = "registry.example/app@sha256:" + "a" * 64
SPEC: dict[str, Any] = {
    "image": PINNED,
    "command": ["true"],
    "outputs": ["result.txt", "sub/b.txt"],
    "output_max_bytes": 1000,
}
DATA = b"the result\n" * 20


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    server = Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "state",
        settings=Settings(handshake_timeout_s=5.0),
    )
    async with server:
        yield server


async def _offered(coordinator: Coordinator, peer: Peer) -> tuple[Any, Offer]:
    pinned = {coordinator.key.key_id: coordinator.key.public_key}
    link_cm = connected(coordinator.url, pinned, peer)
    link = await link_cm.__aenter__()
    await coordinator.submit(peer.node_id, SPEC)
    offer = link.verify(await link.take(JobOffer), pinned)
    return (link_cm, link), offer


async def _put(url: str, body: bytes, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.put(url, content=body, headers=headers)


def _with(url: str, **query: str) -> str:
    parts = urlsplit(url)
    values = {k: v[0] for k, v in parse_qs(parts.query).items()} | query
    return parts._replace(query="&".join(f"{k}={v}" for k, v in values.items())).geturl()


async def test_every_output_gets_a_token_url_and_a_put_is_served_back_by_the_read_api(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    (cm, _), offer = await _offered(coordinator, peer)
    try:
        assert sorted(offer.uploads) == ["result.txt", "sub/b.txt"]
        url = offer.uploads["result.txt"].url
        assert url.startswith(coordinator.artifacts_url + "/artifacts/" + offer.job_id + "?")
        answer = await _put(url, DATA)
        assert answer.status_code == 201, answer.text
        digest = hashlib.sha256(DATA).hexdigest()
        assert answer.json() == {"sha256": digest, "size_bytes": len(DATA)}
        stored = coordinator.state_dir / "artifacts" / "sha256" / digest
        assert stored.read_bytes() == DATA
        assert list((coordinator.state_dir / "artifacts" / "tmp").iterdir()) == []
        async with httpx.AsyncClient() as client:
            base = coordinator.dashboard_url.rstrip("/")
            got = await client.get(f"{base}/api/jobs/{offer.job_id}/outputs/result.txt")
            missing = await client.get(f"{base}/api/jobs/{offer.job_id}/outputs/sub/b.txt")
        assert (got.status_code, got.content) == (200, DATA)
        assert got.headers["x-content-sha256"] == digest
        assert (missing.status_code, missing.json()["error"]["code"]) == (404, "output_missing")
    finally:
        await cm.__aexit__(None, None, None)


async def test_a_receipt_whose_digest_is_not_what_was_stored_is_flagged(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    (cm, link), offer = await _offered(coordinator, peer)
    try:
        assert (await _put(offer.uploads["result.txt"].url, b"not it")).status_code == 201
        outputs = [
            {
                "path": "result.txt",
                "status": "ok",
                "size_bytes": len(DATA),
                "sha256": hashlib.sha256(DATA).hexdigest(),
            },
            {"path": "sub/b.txt", "status": "ok", "size_bytes": 1, "sha256": "b" * 64},
        ]
        await link.send(signed_receipt(peer, offer, outputs=outputs))
        await link.status(offer.job_id, "completed")
        async with httpx.AsyncClient() as client:
            base = coordinator.dashboard_url.rstrip("/")
            job = (await client.get(f"{base}/api/jobs/{offer.job_id}")).json()
        assert job["output_problems"] == ["output_mismatch:result.txt", "output_missing:sub/b.txt"]
        async with httpx.AsyncClient() as client:
            [listed] = (await client.get(f"{base}/api/jobs")).json()["jobs"]
        assert listed["output_problems"] == job["output_problems"]  # what the dashboard shows
    finally:
        await cm.__aexit__(None, None, None)


async def test_tokens_for_another_path_job_or_time_are_refused_403(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    (cm, _), offer = await _offered(coordinator, peer)
    try:
        url = offer.uploads["result.txt"].url
        token = parse_qs(urlsplit(url).query)["token"][0]
        secret = (coordinator.state_dir / "artifacts.key").read_bytes()
        expired = sign_token(secret, offer.job_id, "result.txt", int(time.time()) - 10)
        cases = {
            "other path": _with(url, path="sub%2Fb.txt"),
            "other job": url.replace(offer.job_id, "job-0000000000000000"),
            "expired": _with(url, token=expired),
            "forged": _with(url, token=token[:-4] + "AAAA"),
            "none": _with(url, token=""),
        }
        for what, bad in cases.items():
            answer = await _put(bad, DATA)
            assert answer.status_code == 403, what
            assert answer.json()["error"]["code"] in ("bad_token", "token_expired"), what
        assert coordinator.artifacts is not None
        assert coordinator.artifacts.outputs(offer.job_id) == {}
    finally:
        await cm.__aexit__(None, None, None)


async def test_bodies_over_the_cap_or_short_of_their_length_are_not_stored(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    (cm, _), offer = await _offered(coordinator, peer)
    try:
        url = offer.uploads["result.txt"].url
        answer = await _put(url, b"x" * 1001)  # output_max_bytes is 1000
        assert (answer.status_code, answer.json()["error"]["code"]) == (413, "too_large")
        # Announces 500 bytes, sends 10, and hangs up.
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(
            f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 500\r\n\r\n0123456789".encode()
        )
        writer.write_eof()
        await reader.read()  # the server closes without an answer worth having
        writer.close()
        await writer.wait_closed()
        assert coordinator.artifacts is not None
        assert coordinator.artifacts.outputs(offer.job_id) == {}
        assert list((coordinator.state_dir / "artifacts" / "tmp").iterdir()) == []
        assert list((coordinator.state_dir / "artifacts" / "sha256").iterdir()) == []
    finally:
        await cm.__aexit__(None, None, None)


async def test_a_path_outside_the_outputs_is_refused(coordinator: Coordinator) -> None:
    peer = Peer()
    (cm, _), offer = await _offered(coordinator, peer)
    try:
        secret = (coordinator.state_dir / "artifacts.key").read_bytes()
        token = sign_token(secret, offer.job_id, "../x", int(time.time()) + 60)
        url = f"{coordinator.artifacts_url}/artifacts/{offer.job_id}?path=..%2Fx&token={token}"
        answer = await _put(url, DATA)
        assert answer.status_code == 400
        with pytest.raises(JobError) as caught:
            await coordinator.submit(
                peer.node_id, SPEC, uploads={"../result.txt": {"url": "https://s3/x"}}
            )
        assert caught.value.code == "bad_upload_target"
    finally:
        await cm.__aexit__(None, None, None)


async def test_a_stored_output_is_not_replaced_and_the_read_api_shows_no_credential(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    (cm, _), offer = await _offered(coordinator, peer)
    try:
        url = offer.uploads["result.txt"].url
        assert (await _put(url, DATA)).status_code == 201
        assert (await _put(url, DATA)).status_code == 201  # a node redoing its PUT
        other = await _put(url, b"someone else's")
        assert (other.status_code, other.json()["error"]["code"]) == (409, "output_exists")
        assert coordinator.artifacts is not None
        stored = coordinator.artifacts.outputs(offer.job_id)["result.txt"]
        assert stored.sha256 == hashlib.sha256(DATA).hexdigest()
        async with httpx.AsyncClient() as client:
            base = coordinator.dashboard_url.rstrip("/")
            shown = (await client.get(f"{base}/api/jobs/{offer.job_id}")).text
        token = parse_qs(urlsplit(url).query)["token"][0]
        assert token not in shown
        assert offer.uploads["sub/b.txt"].url.split("token=")[1] not in shown
    finally:
        await cm.__aexit__(None, None, None)


async def test_a_large_output_is_streamed_from_disk_and_the_public_port_does_not_hold_it(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    pinned = {coordinator.key.key_id: coordinator.key.public_key}
    async with connected(coordinator.url, pinned, peer) as link:
        await coordinator.submit(peer.node_id, SPEC | {"output_max_bytes": 64 << 20})
        offer = link.verify(await link.take(JobOffer), pinned)
        big = os.urandom(17 << 20)
        assert (await _put(offer.uploads["result.txt"].url, big)).status_code == 201
        where = f"/api/jobs/{offer.job_id}/outputs/result.txt"
        async with httpx.AsyncClient(timeout=30) as client:
            streamed = await client.get(coordinator.admin_url + where)
            public = await client.get(coordinator.dashboard_url.rstrip("/") + where)
        assert streamed.status_code == 200
        assert hashlib.sha256(streamed.content).digest() == hashlib.sha256(big).digest()
        assert (public.status_code, public.json()["error"]["code"]) == (413, "output_too_large")


async def test_bytes_past_the_announced_length_are_never_stored(coordinator: Coordinator) -> None:
    peer = Peer()
    pinned = {coordinator.key.key_id: coordinator.key.public_key}
    async with connected(coordinator.url, pinned, peer) as link:
        await coordinator.submit(peer.node_id, SPEC)
        offer = link.verify(await link.take(JobOffer), pinned)
        parts = urlsplit(offer.uploads["result.txt"].url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(
            f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 10\r\n\r\n0123456789 and 990 more bytes".encode()
        )
        writer.write_eof()
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert answer.startswith(b"HTTP/1.1 201 ")
        assert coordinator.artifacts is not None
        stored = coordinator.artifacts.outputs(offer.job_id)["result.txt"]
        assert (stored.size_bytes, stored.sha256) == (10, hashlib.sha256(b"0123456789").hexdigest())


async def test_a_token_outlives_the_offer_by_the_jobs_timeout_and_a_day(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    pinned = {coordinator.key.key_id: coordinator.key.public_key}
    async with connected(coordinator.url, pinned, peer) as link:
        await coordinator.submit(peer.node_id, SPEC | {"timeout_s": 7200})
        offer = link.verify(await link.take(JobOffer), pinned)
    token = parse_qs(urlsplit(offer.uploads["result.txt"].url).query)["token"][0]
    assert int(token.split(".")[0]) == int(offer.expires_at + 7200 + 86400)
