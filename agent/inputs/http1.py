"""One HTTP/1.1 GET on a connection of its own, http and https alike.

:func:`get` connects (for https, TLS with certificate checks in :mod:`agent.inputs.tls`:
the bytes it decrypts go where a plain connection's bytes go, so both schemes are one
code path above it), sends the request and reads the answer's head with h11.
:meth:`Answer.receive` then takes the body into a :class:`~agent.inputs.sink.Sink`: a
body of a known length (or one that ends with the connection) is received (or decrypted)
in place into the sink's buffers; a chunked one is decoded by h11 and copied in. Either
way no more than the cap is ever taken, and a server that sends nothing for ``stall_s``
is an ``input_timeout``. Whether the bytes are right is the caller's to check (their
size and digest).
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final, Literal

import h11

from agent.errors import InputError
from agent.inputs.sink import Sink
from agent.inputs.tls import ClientTls

__all__ = ["Answer", "get"]

#: The largest answer head taken, and the most read at once before the body.
_HEAD_BYTES: Final = 1 << 16
#: The most read from the socket at once for https (as asyncio's own TLS reads).
_TLS_READ_BYTES: Final = 1 << 18


class Answer(asyncio.BufferedProtocol):
    """An answer to one GET: its ``status`` and ``headers`` (lower-case names, the last
    value of each), then its body through :meth:`receive`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, url: str, tls: ClientTls | None) -> None:
        self.url = url
        self.status = 0
        self.headers: dict[str, str] = {}
        self.received = 0
        """Body bytes taken so far."""
        self.last_active = loop.time()
        """When a byte last arrived or the sink last made room (the loop's clock)."""
        self._loop = loop
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_HEAD_BYTES)
        self._transport: asyncio.Transport | None = None
        self._scratch = bytearray(_HEAD_BYTES)
        self._tls = tls
        self._raw = bytearray(_TLS_READ_BYTES) if tls is not None else self._scratch
        self._paused = False
        self._ready: asyncio.Future[None] = loop.create_future()
        self._head: asyncio.Future[None] = loop.create_future()
        self._body: asyncio.Future[None] = loop.create_future()
        self._mode: Literal["head", "length", "chunked", "done"] = "head"
        self._left: int | None = None  # bytes the body still has; None: until the close
        self._cap = 0
        self._sink: Sink | None = None
        self._progress: Callable[[int], None] = _no_progress

    # -- what the caller does ----------------------------------------------------------

    async def ask(self, netloc: str, target: str, stall_s: float) -> None:
        """Send the GET for ``target`` at ``netloc``; return once the answer's head is in."""
        try:
            request = h11.Request(
                method="GET",
                target=target,
                headers=[
                    ("Host", netloc),
                    # identity: the digest is of the bytes as sent, and nothing is inflated.
                    ("Accept-Encoding", "identity"),
                    ("Connection", "close"),
                    ("User-Agent", "gpu-agent"),
                ],
            )
            data = self._h11.send(request)
        except h11.LocalProtocolError as exc:
            raise InputError("input_http_error", f"{self.url}: cannot ask for it: {exc}") from None
        assert data is not None
        await self._wait(self._ready, stall_s)  # connected, and for https the handshake done
        if self._tls is not None:
            self._tls.encrypt(data)
            data = self._tls.outgoing()
        assert self._transport is not None
        self._transport.write(data)
        await self._wait(self._head, stall_s)

    async def receive(
        self, fd: int, *, cap: int, stall_s: float, progress: Callable[[int], None] | None = None
    ) -> str:
        """Hash the body and write it to ``fd``; its sha256 once all of it is written.
        More than ``cap`` bytes is ``input_too_large``, at once; ``progress`` is called
        with the bytes received so far as they go to the disk."""
        self._cap, self._progress = cap, progress or _no_progress
        self._sink = sink = Sink(fd, self._woken)
        try:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                self._mode = "chunked"
                self._guarded(self._events)
            else:
                self._mode = "length"
                if (length := self.headers.get("content-length")) is not None:
                    self._left = int(length)  # digits only: h11 checked
                self._guarded(self._take_early)
            if not self._body.done():
                self._resume()
            await self._wait(self._body, stall_s)
            digest = await sink.finish()
        finally:
            sink.close()
        self._progress(self.received)
        return digest

    def close(self) -> None:
        """Drop the connection, whatever is left of the answer unread."""
        if self._transport is not None:
            self._transport.abort()
        for future in (self._ready, self._head, self._body):
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: the caller has moved on
            future.cancel()

    async def _wait(self, future: asyncio.Future[None], stall_s: float) -> None:
        while True:
            idle = self._loop.time() - self.last_active
            if idle >= stall_s:
                raise InputError("input_timeout", f"{self.url}: no byte for {stall_s:g}s")
            done, _ = await asyncio.wait([future], timeout=stall_s - idle)
            if done:
                return future.result()

    # -- asyncio.BufferedProtocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport; start the TLS handshake if there is one."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._tls is None:
            self._ready.set_result(None)
        else:
            self._pump()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the next bytes from the socket go: for https, the raw buffer; else where
        the plain bytes go (:meth:`_plain_buffer`)."""
        return memoryview(self._raw) if self._tls is not None else self._plain_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        """Take ``nbytes`` just received."""
        self.last_active = self._loop.time()
        if self._tls is None:
            self._plain(nbytes)
        else:
            self._tls.feed(memoryview(self._raw)[:nbytes])
            self._pump()

    def eof_received(self) -> bool:
        """The server closed its side; for https, what it sent before is still to be read,
        so the transport is kept until the answer is whole or has failed."""
        if self._tls is None:
            self._eof()
            return False
        self._tls.feed_eof()
        self._pump()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: an error unless the answer was whole."""
        if self._mode == "length" and self._left is None and exc is None:
            self._complete()
        how = f"{exc}" if exc is not None else "closed by the server"
        if self._mode == "head":
            self._fail(InputError("input_unreachable", f"{self.url}: {how}, before an answer"))
        elif self._mode != "done":
            self._fail(
                InputError("input_unreachable", f"{self.url}: {how}, after {self.received} bytes")
            )

    # -- https ------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Go on with the handshake, then decrypt what was received while there is room."""
        assert self._tls is not None
        assert self._transport is not None
        try:
            if not self._tls.ready and self._tls.handshake():
                self._ready.set_result(None)
            while self._tls.ready and not self._paused and self._mode != "done":
                count = self._tls.decrypt_into(self._plain_buffer())
                if count is None:
                    break
                if count:
                    self._plain(count)
                else:
                    self._eof()
        except ssl.SSLError as exc:  # a certificate that does not check, a bad record, ...
            self._fail(InputError("input_unreachable", f"{self.url}: TLS: {exc}"))
        if self._mode != "done" and (data := self._tls.outgoing()):
            self._transport.write(data)

    # -- what the bytes mean ------------------------------------------------------------

    def _plain_buffer(self) -> memoryview:
        """Where the next plain bytes go: in place into the sink for a body of a known
        length (never past that length or one byte over the cap), else the scratch."""
        if self._mode != "length" or self._sink is None:
            return memoryview(self._scratch)
        space = self._sink.space()
        room = self._cap + 1 - self.received if self._left is None else self._left
        return space[:room] if room < len(space) else space

    def _plain(self, count: int) -> None:
        """Take ``count`` plain bytes written into :meth:`_plain_buffer`."""
        if self._mode == "length":
            self._guarded(lambda: self._take(count))
        elif self._mode != "done":
            self._h11.receive_data(bytes(memoryview(self._scratch)[:count]))
            self._guarded(self._events)

    def _eof(self) -> None:
        """The end of the stream: the end of a body without a length, else an error."""
        if self._mode == "length" and self._left is None:
            self._complete()
        elif self._mode == "chunked":
            self._h11.receive_data(b"")
            try:
                self._events()
            except h11.RemoteProtocolError as exc:  # an incomplete chunk, or none at the end
                self._fail(InputError("input_unreachable", f"{self.url}: closed mid-answer: {exc}"))
            except InputError as exc:
                self._fail(exc)
        elif self._mode != "done":
            what = "before an answer" if self._mode == "head" else f"after {self.received} bytes"
            self._fail(InputError("input_unreachable", f"{self.url}: closed {what}"))

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run ``step``; what it finds wrong ends the answer with its error."""
        try:
            step()
        except InputError as exc:
            self._fail(exc)
        except h11.RemoteProtocolError as exc:
            self._fail(InputError("input_http_error", f"{self.url}: not an HTTP/1.1 answer: {exc}"))

    def _take_early(self) -> None:
        """Take the body bytes read along with the head."""
        data, closed = self._h11.trailing_data
        view = memoryview(data)
        while view and self._mode == "length":
            space = self._plain_buffer()
            count = min(len(space), len(view))
            space[:count] = view[:count]
            view = view[count:]
            self._take(count)
        if self._mode == "length" and self._left == 0:  # a body of no bytes: nothing to read
            self._complete()
        elif closed:
            self._eof()

    def _take(self, count: int) -> None:
        assert self._sink is not None
        self.received += count
        if self.received > self._cap:
            raise InputError("input_too_large", f"{self.url}: more than {self._cap} bytes")
        if self._sink.filled(count):
            self._progress(self.received)
        if self._left is not None:
            self._left -= count
            if not self._left:
                self._complete()
                return
        self._check_room()

    def _events(self) -> None:
        """Act on what h11 has made of the bytes so far."""
        while self._mode != "done":
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self.headers = {
                    name.decode("ascii").lower(): value.decode("latin-1")
                    for name, value in event.headers
                }
                self._pause()  # until the caller wants the body
                self._head.set_result(None)
                return
            if isinstance(event, h11.Data):
                assert self._sink is not None
                self.received += len(event.data)
                if self.received > self._cap:
                    raise InputError("input_too_large", f"{self.url}: more than {self._cap} bytes")
                if self._sink.add(event.data):
                    self._progress(self.received)
            elif isinstance(event, h11.EndOfMessage):
                self._complete()
            elif isinstance(event, h11.ConnectionClosed):
                raise InputError("input_unreachable", f"{self.url}: closed mid-answer")
            # h11.InformationalResponse (1xx): the real answer follows
        self._check_room()

    def _check_room(self) -> None:
        if self._sink is not None and self._sink.full:
            self._pause()

    def _pause(self) -> None:
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def _resume(self) -> None:
        """Read again: for https, first what the TLS layer still holds."""
        self._paused = False
        if self._tls is not None:
            self._pump()
        if not self._paused and self._mode != "done" and self._transport is not None:
            self._transport.resume_reading()

    def _woken(self) -> None:
        """The sink's worker is done with a buffer: room again, or an error."""
        assert self._sink is not None
        self.last_active = self._loop.time()
        if self._sink.error is not None:
            self._fail(self._sink.error)
        elif not self._sink.full and self._paused and self._mode != "done":
            self._resume()

    def _complete(self) -> None:
        self._mode = "done"
        if self._transport is not None:
            self._transport.close()
        if not self._body.done():
            self._body.set_result(None)

    def _fail(self, error: BaseException) -> None:
        self._mode = "done"
        if self._transport is not None:
            self._transport.abort()
        for future in (self._ready, self._head, self._body):
            if not future.done():
                future.set_exception(error)
                return


def _no_progress(received: int) -> None:
    """Progress nobody follows."""


@asynccontextmanager
async def get(url: str, *, stall_s: float, context: ssl.SSLContext) -> AsyncIterator[Answer]:
    """GET ``url`` (https through ``context``) and yield once the answer's head is in."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    answer = Answer(loop, url, ClientTls(context, host) if https else None)
    try:
        try:
            async with asyncio.timeout(stall_s):
                await loop.create_connection(
                    lambda: answer, host, parts.port or (443 if https else 80)
                )
        except TimeoutError:
            raise InputError("input_timeout", f"{url}: no connection in {stall_s:g}s") from None
        except OSError as exc:  # refused, unreachable
            raise InputError("input_unreachable", f"{url}: {exc or type(exc).__name__}") from None
        await answer.ask(parts.netloc, target, stall_s)
        yield answer
    finally:
        answer.close()
