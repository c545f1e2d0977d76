"""The agent's health probe of a service against hostile servers on loopback: bounded in
time as a whole, and never reading a body."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from support.processes import free_port

from agent.services.supervisor import http_probe
from sandbox.service_spec import HttpCheck

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CHECK = HttpCheck(path="/health", timeout_s=1.0)


async def _ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


async def _error(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Slowloris from inside: a header byte now and then, for ever."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    while True:
        writer.write(b"a")
        await writer.drain()
        await asyncio.sleep(0.2)


class _Endless:
    """200 with a body of 10 GB, sent as fast as it is taken; counts what was taken."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n")
        chunk = bytes(1 << 16)
        try:
            while self.sent < 10_000_000_000:
                writer.write(chunk)
                await writer.drain()
                self.sent += len(chunk)
        finally:
            self.closed.set()


async def _serving(handler: Handler) -> AsyncIterator[int]:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the probe went away: what the tests want of it
        finally:
            writer.close()

    server = await asyncio.start_server(closing, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def ok_port() -> AsyncIterator[int]:
    async for port in _serving(_ok):
        yield port


async def test_a_2xx_passes_and_anything_else_says_why(ok_port: int) -> None:
    assert await http_probe("127.0.0.1", ok_port, CHECK) == ""
    async for port in _serving(_error):
        assert await http_probe("127.0.0.1", port, CHECK) == "/health answered 503"
    refused = await http_probe("127.0.0.1", free_port(), CHECK)
    assert refused.startswith("ConnectError")


async def test_a_server_that_trickles_its_headers_fails_within_the_timeout() -> None:
    async for port in _serving(_trickle):
        failure = await asyncio.wait_for(http_probe("127.0.0.1", port, CHECK), timeout=30)
    assert failure == "no answer within 1 s"


async def test_a_server_that_sends_gigabytes_costs_the_probe_nothing() -> None:
    endless = _Endless()
    async for port in _serving(endless):
        assert await http_probe("127.0.0.1", port, CHECK) == ""
        await asyncio.wait_for(endless.closed.wait(), timeout=30)
    # What the kernel's buffers held, not the body: the probe closed after the headers.
    assert endless.sent < 64 << 20
