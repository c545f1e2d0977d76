"""The gateway against floods of tiny pieces and of held bytes: the work per byte a
service or a client causes, and the memory all clients' bodies hold, stay bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from support.gateway import coordinator_with_gateway, new_key, replica, until

from coordinator.gateway.client_conn import Limits
from coordinator.gateway.pieces import FREE_PIECES, MIN_PIECE_BYTES
from coordinator.gateway.server import GatewaySettings
from coordinator.server import Coordinator

_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
)


@asynccontextmanager
async def _service(chunks: list[bytes]) -> AsyncIterator[int]:
    """A server on loopback that answers any request with a stream of ``chunks``, each
    its own chunk, all written at once; its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
        writer.write(_HEAD + framed + b"0\r\n\r\n")
        with contextlib.suppress(ConnectionError):  # the gateway may cut it
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _streamed(port: int, key: str) -> bytes:
    """A streamed chat completion's whole answer, head and chunked body as sent."""
    body = json.dumps({"model": "tiny", "stream": True}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
        % (key.encode(), len(body), body)
    )
    try:
        async with asyncio.timeout(20):
            return await reader.read()
    finally:
        writer.close()


def _dechunked(answer: bytes) -> list[bytes]:
    """The chunks of a chunked answer's body (up to where it was cut)."""
    rest = answer.split(b"\r\n\r\n", 1)[1]
    chunks = []
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        if not size or int(size, 16) == 0:
            break
        chunks.append(rest[: int(size, 16)])
        rest = rest[int(size, 16) + 2 :]
    return chunks


async def test_a_service_answering_in_one_byte_chunks_is_cut_with_an_error_event(
    tmp_path: Path,
) -> None:
    async with (
        _service([b"x"] * 200_000) as port,
        coordinator_with_gateway(tmp_path) as coordinator,
        replica(coordinator, "svc-a", ("127.0.0.1", port), ["tiny"]),
    ):
        answer = await _streamed(coordinator.gateway.port, new_key(coordinator))
        coordinator.gateway.records.flush()
        (record,) = coordinator.store.requests.recent(1)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    *data, last = _dechunked(answer)
    # Cut once the pieces passed what their bytes justify (within the first read of
    # them: none passed), long before 200,000 of them; never one chunk on per byte.
    assert set(b"".join(data)) <= {ord("x")}
    assert len(b"".join(data)) <= FREE_PIECES + FREE_PIECES // MIN_PIECE_BYTES + 2
    assert len(data) < 100
    assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "upstream_error"
    assert (record.status, record.code) == (200, "upstream_error")


async def test_a_long_token_stream_of_small_events_passes_whole(tmp_path: Path) -> None:
    # Shorter events than any real server's (OpenAI's and llama.cpp's are 150 bytes and
    # more), each in its own chunk: far past the free pieces, none refused.
    events = [b'data: {"choices": [{"delta": {"content": "%05d"}}]}\n\n' % i for i in range(5000)]
    async with (
        _service(events) as port,
        coordinator_with_gateway(tmp_path) as coordinator,
        replica(coordinator, "svc-a", ("127.0.0.1", port), ["tiny"]),
    ):
        answer = await _streamed(coordinator.gateway.port, new_key(coordinator))
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    assert answer.endswith(b"0\r\n\r\n")
    assert b"".join(_dechunked(answer)) == b"".join(events)


async def test_chunks_read_at_once_reach_the_client_joined(tmp_path: Path) -> None:
    # Within the free pieces: passed whole, but as the few reads they came in, not as a
    # chunk of 1 byte (and 6 of framing) each.
    async with (
        _service([b"x"] * FREE_PIECES) as port,
        coordinator_with_gateway(tmp_path) as coordinator,
        replica(coordinator, "svc-a", ("127.0.0.1", port), ["tiny"]),
    ):
        answer = await _streamed(coordinator.gateway.port, new_key(coordinator))
    assert answer.endswith(b"0\r\n\r\n")
    chunks = _dechunked(answer)
    assert b"".join(chunks) == b"x" * FREE_PIECES
    assert len(chunks) < 100


def _padded(size: int) -> bytes:
    """A request body of ``size`` bytes naming a model nobody serves."""
    head = b'{"model": "tiny", "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def _post_head(key: str, length: int) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
        b"Content-Length: %d\r\n\r\n" % (key.encode(), length)
    )


async def test_bodies_past_what_all_connections_may_hold_are_refused_503(
    tmp_path: Path,
) -> None:
    limits = Limits(
        head_timeout_s=30,
        body_timeout_s=30,
        max_body_bytes=80_000,
        max_held_body_bytes=100_000,
    )
    async with Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "state",
        gateway_settings=GatewaySettings(limits=limits, record_flush_s=0.05),
    ) as coordinator:
        gateway = coordinator.gateway
        key = new_key(coordinator)
        first, second = _padded(70_000), _padded(60_000)
        # A body under way holds what came of it...
        reader_a, writer_a = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer_a.write(_post_head(key, len(first)) + first[:60_000])
        await until(lambda: gateway.body_bytes_held == 60_000, "the first body's bytes held")
        # ... so a second one, within its own bound, passes what all may hold: refused.
        reader_b, writer_b = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer_b.write(_post_head(key, len(second)) + second)
        async with asyncio.timeout(10):
            refused = await reader_b.read()
        writer_b.close()
        assert refused.startswith(b"HTTP/1.1 503 "), refused[:100]
        assert b"\r\nretry-after: 1\r\n" in refused.lower()
        assert json.loads(refused.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "gateway_busy"
        assert gateway.body_bytes_held == 60_000
        # The first ends, is answered (nobody serves its model), and holds nothing more.
        writer_a.write(first[60_000:])
        async with asyncio.timeout(10):
            answered = await reader_a.readuntil(b"\r\n\r\n")
        assert answered.startswith(b"HTTP/1.1 404 "), answered
        await until(lambda: gateway.body_bytes_held == 0, "the first body given back")
        writer_a.close()
        # Then the second, sent again, is read whole.
        reader_b, writer_b = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer_b.write(_post_head(key, len(second)) + second)
        async with asyncio.timeout(10):
            answered = await reader_b.readuntil(b"\r\n\r\n")
        writer_b.close()
        assert answered.startswith(b"HTTP/1.1 404 "), answered
