"""The gateway against hostile clients and services: it stays up, answers with codes, and
holds bounded connections, tasks and bytes."""

from __future__ import annotations

import asyncio
import json
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.fake_openai import HUGE_BYTES, FakeOpenAI
from support.gateway import coordinator_with_gateway, new_key, replica, until

from coordinator.admission import Settings
from coordinator.gateway.client_conn import Limits
from coordinator.gateway.proxy import Timeouts
from coordinator.gateway.server import GatewaySettings
from coordinator.server import Coordinator

_CAP = 32 << 20


@asynccontextmanager
async def _coordinator(tmp_path: Path, settings: GatewaySettings) -> AsyncIterator[Coordinator]:
    server = Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "state",
        settings=Settings(handshake_timeout_s=5.0),
        gateway_settings=settings,
    )
    async with server:
        yield server


def _settings(*, max_connections: int = 1024, head_timeout_s: float = 0.5) -> GatewaySettings:
    return GatewaySettings(
        limits=Limits(
            head_timeout_s=head_timeout_s,
            body_timeout_s=0.5,
            write_timeout_s=1.0,
            max_connections=max_connections,
        ),
        timeouts=Timeouts(first_byte_s=5.0, idle_s=0.5, queue_s=0.2, max_response_bytes=_CAP),
        record_flush_s=0.05,
    )


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI("server-a")
    await fake.start()
    yield fake
    await fake.stop()


async def _until_answered(reader: asyncio.StreamReader) -> bytes:
    """What the gateway sends until it closes (a hang fails the test)."""
    async with asyncio.timeout(10):
        return await reader.read()


def _request(key: str, body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (key.encode(), len(data), data)
    )


async def test_slow_and_oversized_requests_are_answered_with_a_code_and_closed(
    tmp_path: Path,
) -> None:
    async with _coordinator(tmp_path, _settings()) as coordinator:
        port = coordinator.gateway.port
        key = new_key(coordinator).encode()
        openings = [
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Slow: ",  # a head never done
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n"
            b"Authorization: Bearer " + key + b"\r\n\r\n{",  # a body never done
            b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
            b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 99999999\r\n\r\n",
            b"\x16\x03\x01 not http at all\r\n\r\n",
            # No key: refused before its body is read (it is never sent here).
            b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 8000000\r\n\r\n",
        ]
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in openings]
        for (_, writer), opening in zip(clients, openings, strict=True):
            writer.write(opening)
        # A hundred more that send nothing at all.
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(100)]
        answers = [await _until_answered(reader) for reader, _ in clients]
        silent = [await _until_answered(reader) for reader, _ in idle]
        statuses = [a.split(b" ", 2)[1] for a in answers]
        assert statuses == [b"408", b"408", b"431", b"413", b"400", b"401"]
        assert [json.loads(a.split(b"\r\n\r\n", 1)[1])["error"]["code"] for a in answers] == [
            "request_timeout",
            "request_timeout",
            "headers_too_large",
            "request_too_large",
            "bad_request",
            "invalid_api_key",
        ]
        assert silent == [b""] * 100  # idle connections are closed without a word
        for _, writer in clients + idle:
            writer.close()
        await until(lambda: coordinator.gateway.connections == 0, "every connection closed")


async def test_a_body_in_a_hundred_thousand_one_byte_chunks_is_refused(tmp_path: Path) -> None:
    async with coordinator_with_gateway(tmp_path) as coordinator:
        key = new_key(coordinator)
        body = b'{"model": "tiny"}'.ljust(100_000)
        reader, writer = await asyncio.open_connection("127.0.0.1", coordinator.gateway.port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" % key.encode()
        )
        writer.write(b"".join(b"1\r\n%c\r\n" % byte for byte in body) + b"0\r\n\r\n")
        try:
            async with asyncio.timeout(20):
                answer = await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()
    # Not read to its end and routed (404 model_not_found): refused as it came (1-byte
    # pieces cost the loop ~7 us each, whatever the body's size).
    assert answer.startswith(b"HTTP/1.1 400 "), answer


async def test_connections_past_the_cap_are_refused_503(tmp_path: Path) -> None:
    async with _coordinator(tmp_path, _settings(max_connections=3, head_timeout_s=30)) as c:
        held = [await asyncio.open_connection("127.0.0.1", c.gateway.port) for _ in range(3)]
        await until(lambda: c.gateway.connections == 3, "three connections served")
        reader, writer = await asyncio.open_connection("127.0.0.1", c.gateway.port)
        answer = await _until_answered(reader)
        assert answer.startswith(b"HTTP/1.1 503 ")
        writer.close()
        for _, held_writer in held:
            held_writer.close()
        await until(lambda: c.gateway.connections == 0, "the held connections closed")


async def test_a_refused_client_that_sent_its_request_reads_the_503(tmp_path: Path) -> None:
    async with _coordinator(tmp_path, _settings(max_connections=1, head_timeout_s=30)) as c:
        _, held = await asyncio.open_connection("127.0.0.1", c.gateway.port)
        await until(lambda: c.gateway.connections == 1, "one connection served")
        reader, writer = await asyncio.open_connection("127.0.0.1", c.gateway.port)
        # Sent before the gateway sees the connection: closed unread, the socket would be
        # reset, and this side's kernel drop the answer before it is read.
        writer.write(_request("gpk-x", {"model": "tiny", "pad": "x" * 30_000}))
        try:
            answer = await _until_answered(reader)
        except ConnectionResetError:
            answer = b"reset"
        writer.close()
        held.close()
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:60]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "replicas_busy"


async def test_a_client_refused_mid_body_reads_its_refusal(tmp_path: Path) -> None:
    async with _coordinator(tmp_path, _settings()) as coordinator:
        reader, writer = await asyncio.open_connection("127.0.0.1", coordinator.gateway.port)
        # Refused from its head (too large), the rest of it sent and unread: closed so,
        # the socket would be reset, and this side's kernel drop the answer.
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 99999999\r\n\r\n"
            + b"x" * 1_000_000
        )
        try:
            answer = await _until_answered(reader)
        except ConnectionResetError:
            answer = b"reset"
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:60]


async def test_one_address_holding_every_connection_leaves_others_served(tmp_path: Path) -> None:
    limits = Limits(head_timeout_s=30, max_connections=8, max_connections_per_source=4)
    async with _coordinator(tmp_path, GatewaySettings(limits=limits)) as coordinator:
        port = coordinator.gateway.port
        # One address tries to hold them all: its share is served, the rest refused.
        held = [
            await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            for _ in range(8)
        ]
        refused = [await _until_answered(reader) for reader, _ in held[4:]]
        assert [a.split(b" ", 2)[1] for a in refused] == [b"503"] * 4
        assert coordinator.gateway.connections == 4
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        answer = await _until_answered(reader)
        writer.close()
        for _, held_writer in held:
            held_writer.close()
        await until(lambda: coordinator.gateway.connections == 0, "the held connections closed")
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:60]  # served: its key refused


async def test_a_replica_at_its_max_streams_makes_the_next_request_wait_then_503(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    server.mode = "hold"
    async with (
        _coordinator(tmp_path, _settings()) as coordinator,
        replica(coordinator, "svc-a", ("127.0.0.1", server.port), ["tiny"], max_streams=1),
    ):
        key = new_key(coordinator)
        reader, writer = await asyncio.open_connection("127.0.0.1", coordinator.gateway.port)
        writer.write(_request(key, {"model": "tiny", "stream": True}))
        await reader.readuntil(b"data: ")
        async with httpx.AsyncClient(trust_env=False) as client:
            url = f"{coordinator.gateway_url}/chat/completions"
            headers = {"authorization": f"Bearer {key}"}
            busy = await client.post(url, json={"model": "tiny"}, headers=headers)
            assert (busy.status_code, busy.headers["retry-after"]) == (503, "1")
            assert busy.json()["error"]["code"] == "replicas_busy"
            writer.close()
            await server.closed.get()
            server.mode = "ok"
            await until(
                lambda: coordinator.gateway.proxy.router.outstanding("svc-a") == 0, "released"
            )
            served = await client.post(url, json={"model": "tiny"}, headers=headers)
        assert served.status_code == 200
        assert len(server.requests) == 2  # the refused one never reached it


async def test_a_silent_service_ends_the_stream_with_an_error_event(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    server.mode = "slow"
    server.slow_s = 30.0  # far past the gateway's idle timeout
    async with (
        _coordinator(tmp_path, _settings()) as coordinator,
        replica(coordinator, "svc-a", ("127.0.0.1", server.port), ["tiny"]),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", coordinator.gateway.port)
        writer.write(_request(new_key(coordinator), {"model": "tiny", "stream": True}))
        answer = await _until_answered(reader)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    event = answer.split(b"data: ", 1)[1].split(b"\n\n", 1)[0]
    assert json.loads(event)["error"]["code"] == "upstream_timeout"
    assert not answer.endswith(b"0\r\n\r\n")  # cut, not ended as if whole


async def test_a_ten_gigabyte_answer_is_cut_at_the_cap_with_bounded_memory(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    server.mode = "huge"
    async with (
        _coordinator(tmp_path, _settings()) as coordinator,
        replica(coordinator, "svc-a", ("127.0.0.1", server.port), ["tiny"]) as one,
    ):
        before = asyncio.all_tasks()
        peak = _peak_rss()
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            url = f"{coordinator.gateway_url}/completions"
            headers = {"authorization": f"Bearer {new_key(coordinator)}"}
            async with client.stream("POST", url, json={"model": "tiny"}, headers=headers) as r:
                assert r.headers["content-length"] == str(HUGE_BYTES)
                received = await _count(r)
        assert received == _CAP  # the bytes up to the cap, and not one more
        await until(lambda: coordinator.tunnels.open_streams(one.node_id) == 0, "the reset")
        await until(lambda: coordinator.gateway.connections == 0, "the connection closed")
        # None of the coordinator's left behind (the node's tunnel may start its own).
        await until(lambda: not _coordinators_since(before), "the request's tasks ended")
        # The server wrote what the windows and buffers take past the cap, not gigabytes;
        # and this process held no more than a few windows of it.
        assert server.sent_bytes < _CAP + (64 << 20)
        assert _peak_rss() - peak < 128 << 20


async def test_a_client_that_stops_reading_is_dropped_and_its_stream_reset(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    server.mode = "huge"
    async with (
        _coordinator(tmp_path, _settings()) as coordinator,
        replica(coordinator, "svc-a", ("127.0.0.1", server.port), ["tiny"]) as one,
    ):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", coordinator.gateway.port, limit=1 << 16
        )
        transport = writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        writer.write(_request(new_key(coordinator), {"model": "tiny"}))
        await reader.readuntil(b"\r\n\r\n")
        transport.pause_reading()  # reads nothing more: the gateway's writes back up
        await until(lambda: coordinator.tunnels.open_streams(one.node_id) == 0, "the reset")
        await until(lambda: coordinator.gateway.connections == 0, "the connection dropped")
        writer.close()
    assert server.sent_bytes < 64 << 20


async def _count(response: httpx.Response) -> int:
    """The bytes of a body that must end short (the connection closed early)."""
    received = 0
    try:
        async for piece in response.aiter_raw():
            received += len(piece)
    except httpx.RemoteProtocolError:
        return received
    raise AssertionError(f"the body ended whole after {received} bytes")


def _coordinators_since(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """The tasks started since ``before`` that run the coordinator's code."""
    return [
        task
        for task in asyncio.all_tasks() - before
        if isinstance(coro := task.get_coro(), types.CoroutineType)
        and "/coordinator/" in coro.cr_code.co_filename
    ]


def _peak_rss() -> int:
    """This process's peak resident memory, in bytes (Linux's VmHWM)."""
    status = Path("/proc/self/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
