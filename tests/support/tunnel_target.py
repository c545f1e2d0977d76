"""A plain HTTP/1.1 server on loopback, the service a tunnel's streams reach, and a client.

Paths: ``/bytes/N`` answers N bytes (a pattern: one out of place shows), ``/echo`` answers
the request's body, ``/hold`` answers its headers and then holds the connection until the
client closes it, ``/events`` writes each item of :attr:`Target.events` as it comes (a
token stream; None ends it), ``/tokens/N`` writes N server-sent events as fast as it can,
each written and drained on its own (a model server's stream), ``/reset`` writes a few
bytes and resets the connection (RST), and ``POST /v1/completions`` (a path the gateway
routes by model) whose JSON body asks ``{"model": ..., "bytes": N}`` answers N bytes as
``/bytes/N`` does, and ``{"model": ..., "tokens": N}`` N events as ``/tokens/N`` does.
Every answer closes the connection. The server counts connections open now and at most,
and records each one closed while held.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import struct
import sys
from collections.abc import Iterator
from typing import Protocol

__all__ = [
    "BULK_PATH",
    "ByteStream",
    "Target",
    "exchange",
    "pattern",
    "request",
    "serve_until_stdin_closes",
]

#: The path of a large answer asked for by model, as the gateway routes it.
BULK_PATH = "/v1/completions"
_PIECE = 1 << 16


@functools.cache
def _block(seed: int) -> bytes:
    """One period of :func:`pattern`, repeated to a little over a piece's length."""
    period = bytes((seed * 7 + i) % 251 for i in range(251 * 64))
    return period * (_PIECE // len(period) + 2)


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes whose values depend on their offset and ``seed``."""
    return b"".join(_pattern_pieces(size, seed))


def _pattern_pieces(size: int, seed: int) -> Iterator[bytes]:
    block, period = _block(seed), 251 * 64
    for at in range(0, size, _PIECE):
        yield block[at % period : at % period + min(_PIECE, size - at)]


def request(method: str, path: str, body: bytes = b"") -> bytes:
    """An HTTP/1.1 request's bytes."""
    head = f"{method} {path} HTTP/1.1\r\nHost: svc\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class ByteStream(Protocol):
    async def read(self, max_bytes: int = ...) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def write_eof(self) -> None: ...


async def exchange(stream: ByteStream, data: bytes) -> bytes:
    """Write a request, half-close, and read the answer to its end."""
    await stream.write(data)
    await stream.write_eof()
    parts = []
    while chunk := await stream.read(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


class Target:
    """The HTTP server: :meth:`start` it, read :attr:`port`, :meth:`stop` it."""

    def __init__(self) -> None:
        self.port = 0
        self.open_now = 0
        self.open_max = 0
        self.accepted = 0
        self.held_closed: asyncio.Queue[None] = asyncio.Queue()
        """One item per ``/hold`` connection the client closed."""
        self.holding = asyncio.Event()
        """Set when a ``/hold`` connection has been answered its headers."""
        self.events: asyncio.Queue[bytes | None] = asyncio.Queue()
        """What ``/events`` writes, one item at a time."""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def direct(self, data: bytes) -> bytes:
        """The answer to a request sent straight to the server, not through a tunnel."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(data)
            await writer.drain()
            writer.write_eof()
            return await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        self.open_now += 1
        self.open_max = max(self.open_max, self.open_now)
        try:
            await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()
            self._handlers.discard(task)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        _, path, _ = lines[0].split(" ")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = await reader.readexactly(length)
        if path == "/echo":
            size, pieces = len(body), iter([body])
        elif path.startswith("/bytes/"):
            size = int(path.removeprefix("/bytes/"))
            pieces = _pattern_pieces(size, seed=len(path))
        elif path == BULK_PATH and "tokens" in (asked := json.loads(body)):
            await _tokens(writer, int(asked["tokens"]))
            return
        elif path == BULK_PATH:
            size = int(asked["bytes"])
            pieces = _pattern_pieces(size, seed=len(path))
        elif path == "/hold":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            await writer.drain()
            self.holding.set()
            try:
                while await reader.read(1 << 16):
                    pass
            except ConnectionError:  # an abort: a reset rather than an EOF
                pass
            self.held_closed.put_nowait(None)
            return
        elif path == "/events":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            while (event := await self.events.get()) is not None:
                writer.write(event)
                await writer.drain()
            return
        elif path.startswith("/tokens/"):
            await _tokens(writer, int(path.removeprefix("/tokens/")))
            return
        elif path == "/reset":
            writer.write(b"HTTP/1.1 200 OK\r\n")
            await writer.drain()
            sock = writer.get_extra_info("socket")
            # A zero linger time: closing sends RST, not FIN (a crashed server's way).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % size)
        # Written in pieces, each awaited: a slow reader holds the server back, as a real one.
        for piece in pieces:
            writer.write(piece)
            await writer.drain()


async def _tokens(writer: asyncio.StreamWriter, count: int) -> None:
    """``count`` server-sent events, each written and drained on its own."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
    for n in range(count):
        writer.write(b'data: {"token": %d}\n\n' % n)
        await writer.drain()


async def serve_until_stdin_closes() -> None:
    """Serve, print the port on stdout, and stop once stdin closes: the benches' service,
    a process of its own (``python tests/support/tunnel_target.py``: stdlib only)."""
    target = Target()
    await target.start()
    print(target.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await target.stop()


if __name__ == "__main__":
    asyncio.run(serve_until_stdin_closes())
