"""A small OpenAI-style model server on loopback: the service behind the gateway's tests.

``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` answer in
OpenAI's shapes, each naming the server in ``system_fingerprint`` (which replica served).
A streamed chat answers ``max_tokens`` events (``tokens`` when the request says none),
each written and drained on its own, then a last event with ``usage`` when the request
asked for it (``stream_options``), then ``[DONE]``; a plain answer has as many words.
:attr:`FakeOpenAI.mode` makes it hostile:

- ``"ok"``: as above;
- ``"reset"``: reads the request, then resets the connection (RST) before any byte;
- ``"hold"``: a stream's head and first event, then nothing until the peer closes
  (:attr:`FakeOpenAI.closed` gets an item then: a cancellation reached the server);
- ``"huge"``: an answer of ``Content-Length`` 10 GB, written as fast as it is taken;
- ``"slow"``: a stream's head, then one byte at a time, ``slow_s`` apart.

Every answer closes its connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

__all__ = ["HUGE_BYTES", "FakeOpenAI"]

HUGE_BYTES = 10 * 10**9
_CHUNK = b"x" * (1 << 16)


class FakeOpenAI:
    """The server: :meth:`start` it, read :attr:`port`, :meth:`stop` it."""

    def __init__(self, name: str, *, tokens: int = 5) -> None:
        self.name = name
        self.tokens = tokens
        self.mode = "ok"
        self.slow_s = 1.0
        self.port = 0
        self.requests: list[dict[str, Any]] = []
        self.sent_bytes = 0
        self.closed: asyncio.Queue[None] = asyncio.Queue()
        self.holding = asyncio.Event()
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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        _, path, _ = lines[0].split(" ")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        request = json.loads(await reader.readexactly(length) or b"{}")
        self.requests.append(request)
        if self.mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if self.mode == "huge":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % HUGE_BYTES)
            while True:
                writer.write(_CHUNK)
                self.sent_bytes += len(_CHUNK)
                await writer.drain()
        if request.get("stream"):
            await self._stream(request, reader, writer)
            return
        if path == "/v1/embeddings":
            body: dict[str, Any] = {
                "object": "list",
                "model": request["model"],
                "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            }
        else:
            body = self._completion(request, path)
        data = json.dumps(body).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(data) + data
        )
        await writer.drain()

    def _count(self, request: dict[str, Any]) -> int:
        asked = request.get("max_tokens")
        return asked if isinstance(asked, int) and asked > 0 else self.tokens

    def _completion(self, request: dict[str, Any], path: str) -> dict[str, Any]:
        count = self._count(request)
        text = " ".join(f"t{n}" for n in range(count))
        chat = path == "/v1/chat/completions"
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
            choice["logprobs"] = None
        return {
            "id": "cmpl-1",
            "object": "chat.completion" if chat else "text_completion",
            "created": 0,
            "model": request["model"],
            "system_fingerprint": self.name,
            "choices": [choice],
            "usage": {"prompt_tokens": 7, "completion_tokens": count, "total_tokens": 7},
        }

    async def _stream(
        self, request: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        if self.mode == "slow":
            while True:
                writer.write(b":")
                await writer.drain()
                await asyncio.sleep(self.slow_s)
        count = self._count(request)
        for n in range(count):
            writer.write(self._event(request, {"content": f"t{n} "}))
            await writer.drain()
            if self.mode == "hold":
                self.holding.set()
                try:
                    while await reader.read(1 << 16):
                        pass
                except ConnectionError:
                    pass
                self.closed.put_nowait(None)
                return
        if (request.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 7, "completion_tokens": count, "total_tokens": 7}
            writer.write(self._event(request, None, usage))
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()

    def _event(
        self, request: dict[str, Any], delta: dict[str, str] | None, usage: Any = None
    ) -> bytes:
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": request["model"],
            "system_fingerprint": self.name,
            "choices": [] if delta is None else [{"index": 0, "delta": delta}],
            "usage": usage,
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"
