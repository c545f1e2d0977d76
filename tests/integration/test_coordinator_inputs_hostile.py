"""Hostile inputs across the coordinator that a review found holes in: readings past a
double's range, bodies nested past msgspec's depth (gateway, admin API, a service's usage
events), a pipelined request past a header block, a peer proof in non-ASCII digits, an
unbounded path in a request record, and who may read the store's file."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
from pathlib import Path

import pytest
from msgspec import Raw
from support.admission import started
from support.fake_openai import FakeOpenAI
from support.gateway import SETTINGS, coordinator_with_gateway, new_key, replica
from support.processes import free_port

from agent.protocol.messages import TelemetryBody, encode_frame, wrap
from coordinator.db_open import open_database
from coordinator.downsample import downsample
from coordinator.server import Coordinator
from coordinator.store import Store

# A reading no double holds: msgspec keeps a sample's values as the bytes received
# (msgspec.Raw), so the protocol lets it through; SQLite's JSON reads it as +-inf.
_HUGE = b'[{"id": "GPU-0", "power_w": 1e400}, {"id": "GPU-0", "power_w": -1e400}]'


def _hostile_telemetry(seq: int) -> str:
    sample = {"taken_at": Raw(b"600"), "gpus": Raw(_HUGE)}
    return encode_frame(wrap(TelemetryBody(samples=[sample]), seq))


def test_readings_of_plus_and_minus_1e400_do_not_stop_every_nodes_fold(tmp_path: Path) -> None:
    target = tmp_path / "c.db"
    store = Store(target)
    try:
        # The hostile node is folded first (node ids in order); an honest one after it.
        for node_id in ("node-aa", "node-bb"):
            store.nodes.seen(node_id, "key", 0.0)
        hostile = {"taken_at": Raw(b"600"), "gpus": Raw(_HUGE)}
        store.add("node-aa", 1, "telemetry", {"samples": [hostile]}, 1)
        honest = {"taken_at": 600, "gpus": [{"id": "GPU-0", "power_w": 7}]}
        store.add("node-bb", 1, "telemetry", {"samples": [honest]}, 1)
        downsample(target, received_before=10, aggregates_before=0)
        db = open_database(target)
        try:
            rows = db.execute("SELECT node_id, mean FROM telemetry_minutes").fetchall()
        finally:
            db.close()
        assert ("node-bb", 7.0) in rows
        assert store.nodes.all_seqs("node-bb") == []
    finally:
        store.close()


async def test_a_body_nested_past_msgspecs_depth_is_refused_400_not_dropped(
    tmp_path: Path,
) -> None:
    async with coordinator_with_gateway(tmp_path) as coordinator:
        key = new_key(coordinator)
        body = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        reader, writer = await asyncio.open_connection("127.0.0.1", coordinator.gateway.port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (key.encode(), len(body), body)
        )
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "bad_request"


async def test_a_pipelined_request_past_a_header_blocks_worth_leaves_the_first_answered(
    tmp_path: Path,
) -> None:
    server = FakeOpenAI("server-a")
    await server.start()
    try:
        async with (
            coordinator_with_gateway(tmp_path) as coordinator,
            replica(coordinator, "svc-a", ("127.0.0.1", server.port), ["tiny"]),
        ):
            key = new_key(coordinator)
            first = json.dumps({"model": "tiny"}).encode()
            # The next request's bytes arrive while the first is answered: more than the
            # watcher keeps (a header block's worth) before it stops reading.
            second = json.dumps({"model": "tiny", "pad": "x" * 200_000}).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", coordinator.gateway.port)
            writer.write(b"".join(_post(key, body) for body in (first, second)))
            async with asyncio.timeout(10):
                # Both answered; then the idle connection is closed (the head timeout).
                answers = await reader.read()
            writer.close()
            assert answers.startswith(b"HTTP/1.1 200 "), answers[:200]
            assert answers.count(b"HTTP/1.1 200 ") == 2, answers[:200]
    finally:
        await server.stop()


def _post(key: str, body: bytes) -> bytes:
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (key.encode(), len(body), body)
    )


@pytest.mark.postgres
async def test_a_peer_proof_timed_in_superscript_digits_is_refused_403(
    postgres_url: str, tmp_path: Path
) -> None:
    # "²" (0xb2 in latin-1) is a digit to str.isdigit, and no number to int().
    port = free_port()
    async with Coordinator(
        db_path=postgres_url,
        state_dir=tmp_path / "a",
        gateway_port=port,
        gateway_settings=SETTINGS,
        peer_url=f"http://127.0.0.1:{port}",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /_peer/streams/node-aa/job-1 HTTP/1.1\r\nHost: gw\r\nConnection: upgrade\r\n"
            b"Upgrade: gpu-agent-stream\r\ngpu-peer-auth: \xb2:" + b"0" * 64 + b"\r\n\r\n"
        )
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]


def _admin_post(coordinator: Coordinator, path: str, body: bytes) -> tuple[int, bytes]:
    host, port = coordinator.admin_url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        headers = {"Authorization": f"Bearer {coordinator.admin_token}"}
        connection.request("POST", path, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


async def test_an_admin_body_nested_past_msgspecs_depth_is_refused_400(tmp_path: Path) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    async with started(tmp_path) as coordinator:
        answers = [
            await asyncio.to_thread(_admin_post, coordinator, path, body)
            for path, body in (
                ("/api/deployments", b'{"name": "x", "replicas": 1, "spec": ' + nested + b"}"),
                ("/api/jobs", b'{"node_id": "node-aa", "spec": ' + nested + b"}"),
            )
        ]
    assert [status for status, _ in answers] == [400, 400], answers


async def test_a_services_usage_event_nested_past_msgspecs_depth_passes_through(
    tmp_path: Path,
) -> None:
    nested = b'data: {"usage": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}\n\n"

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            + nested
            + b"data: [DONE]\n\n"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(service, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            coordinator_with_gateway(tmp_path) as coordinator,
            replica(coordinator, "svc-a", ("127.0.0.1", port), ["tiny"]),
        ):
            key = new_key(coordinator)
            body = json.dumps({"model": "tiny", "stream": True}).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", coordinator.gateway.port)
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                % (key.encode(), len(body), body)
            )
            async with asyncio.timeout(10):
                answer = await reader.read()
            writer.close()
            assert b"data: [DONE]" in answer, answer[-200:]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_requests_record_keeps_a_bounded_path(tmp_path: Path) -> None:
    async with coordinator_with_gateway(tmp_path) as coordinator:
        key = new_key(coordinator)
        reader, writer = await asyncio.open_connection("127.0.0.1", coordinator.gateway.port)
        writer.write(
            b"GET /v1/" + b"x" * 15_000 + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
            b"Authorization: Bearer %s\r\n\r\n" % key.encode()
        )
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 404 ")
        coordinator.gateway.records.flush()
        (record,) = coordinator.store.requests.recent(1)
    assert record.path == "/v1/" + "x" * 252  # its start, for whoever looks


def test_a_new_store_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    # It holds registry logins and upload URLs: the read API redacts them, the file must too.
    previous = os.umask(0o022)
    try:
        store = Store(tmp_path / "c.db")
    finally:
        os.umask(previous)
    try:
        store.nodes.seen("node-aa", "key", 0.0)
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    finally:
        store.close()
    assert modes == {"c.db": "0o600", "c.db-wal": "0o600", "c.db-shm": "0o600"}
