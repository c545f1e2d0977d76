"""The agent's side of the tunnel: streams the coordinator opens, carried to local services.

:class:`ServiceTunnel` keeps the node's data connection up (a second websocket, on
``/tunnel``, beside the control link: docs/protocol.md, "Tunnel"), authenticated with
the same mutual handshake, and reconnects with the link's backoff (:func:`retry`). Each
stream the coordinator opens names a target; ``resolve`` maps it to a local TCP address
(None: unknown, reset ``unknown_target``), and the stream's bytes are pumped both ways
under the tunnel's flow control: nothing is read from a service faster than the
coordinator reads it, nor from the coordinator faster than the service takes it.

A stream reset by the coordinator (its client went away) aborts the service's connection;
a service that closes, or fails, ends or resets the stream. The data connection lost
aborts every service connection on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from agent.link.connection import LinkConfig, Session, retry
from agent.link.identity import Identity
from agent.protocol import crypto
from agent.protocol.errors import ProtocolError, TunnelError
from agent.protocol.limits import MAX_FRAME_BYTES, NONCE_BYTES
from agent.protocol.messages import decode_frame, encode_frame, require_text
from agent.protocol.session import AgentHandshake, HandshakeState
from agent.protocol.tunnel import (
    CHUNK_BYTES,
    MAX_STREAMS,
    TUNNEL_PATH,
    ResetCode,
    Role,
    StreamEnded,
    StreamOpened,
    StreamReset,
    TunnelEvent,
    TunnelFailed,
    TunnelMux,
)
from agent.services.tunnel_conn import ServiceConnection
from agent.services.tunnel_ws import MessageWriter

__all__ = ["Resolve", "ServiceTunnel", "tunnel_url"]

_log = logging.getLogger(__name__)

Resolve = Callable[[str], Awaitable[tuple[str, int] | None]]
"""The local address of a target name (later: a service container's IP and port); None:
no such service now."""

#: Bytes read from a service queued in the machine before reading it pauses...
_HIGH_WATER: Final = 64 * 1024
#: ... unless all streams together have queued less than this: a lone bulk stream keeps
#: reading while the writer sends, instead of pausing and resuming at each read (two
#: epoll_ctl calls and a loop turn per read: a tenth of the agent's CPU in a bulk answer).
#: Reading resumes once the stream is under the first, or all are under half this.
_QUEUE_BUDGET: Final = 2 * 1024 * 1024
_READ_BYTES: Final = 4 * CHUNK_BYTES
_CLOSE_POLICY: Final = 1008


def tunnel_url(control_url: str) -> str:
    """The data connection's URL beside a control link's ``ws(s)://host:port/agent``."""
    base, _, _ = control_url.rpartition("/")
    return base + TUNNEL_PATH


class ServiceTunnel:
    """Keeps the node's data connection up while :meth:`run` runs (or between
    :meth:`start` and :meth:`stop`), serving the coordinator's streams.

    Args:
        url: ``ws(s)://host:port/tunnel`` (:func:`tunnel_url` of the control link's).
        identity: the node's key: the coordinator knows the node by it.
        pinned_keys: the coordinator keys trusted, by key id, as the control link's.
        resolve: a target name's local address.
        ssl_context: for ``wss://`` (None: the system's defaults).
        agent_version: sent in ``hello``.
        max_streams: streams served at once; the coordinator's opens past it are reset
            ``too_many_streams``.
        connect_timeout_s: to open a service's connection, and the websocket's handshake.
        backoff_initial_s, backoff_max_s, healthy_after_s: as :class:`LinkConfig`'s.
    """

    def __init__(
        self,
        *,
        url: str,
        identity: Identity,
        pinned_keys: Mapping[str, bytes],
        resolve: Resolve,
        ssl_context: ssl.SSLContext | None = None,
        agent_version: str = "0",
        max_streams: int = MAX_STREAMS,
        connect_timeout_s: float = 10.0,
        ping_interval_s: float = 20.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        healthy_after_s: float = 10.0,
    ) -> None:
        self.url = url
        self.identity = identity
        self.resolve = resolve
        self.ssl_context = ssl_context
        self.agent_version = agent_version
        self.max_streams = max_streams
        self.connect_timeout_s = connect_timeout_s
        self.ping_interval_s = ping_interval_s
        self._backoff = LinkConfig(
            url=url,
            pinned_keys=dict(pinned_keys),
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            healthy_after_s=healthy_after_s,
        )
        self.connected = asyncio.Event()
        """Set while the data connection is open."""
        self.next_delay_s = 0.0
        """The delay chosen before the next connection attempt."""
        self.last_error: str | None = None
        """The code of what ended the last connection (None: it closed cleanly)."""
        self._session: _Session | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def open_streams(self) -> int:
        """Streams served now."""
        return self._session.mux.open_streams if self._session is not None else 0

    def streams_to(self, target: str) -> int:
        """Streams served now to ``target``: a service's requests in flight."""
        session = self._session
        return sum(p.target == target for p in session.pipes.values()) if session else 0

    def start(self) -> None:
        """Run in the background until :meth:`stop`."""
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self.run(self._stop))

    async def stop(self) -> None:
        """Close the data connection (every stream on it is reset) and stop."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set, reconnecting with backoff."""
        failures = 0
        while not stop.is_set():
            welcomed_at: float | None = None
            try:
                async with connect(
                    self.url,
                    max_size=MAX_FRAME_BYTES,
                    ping_interval=self.ping_interval_s,
                    open_timeout=self.connect_timeout_s,
                    ssl=self.ssl_context,
                    # No permessage-deflate: it would cost more CPU than the bytes, and
                    # compressing a client's secrets beside its own chosen bytes before
                    # TLS leaks them by the length (the BREACH attack).
                    compression=None,
                ) as ws:
                    async with asyncio.timeout(self.connect_timeout_s):
                        await self._handshake(ws)
                    welcomed_at = time.monotonic()
                    self.last_error = None
                    await self._serve(ws, stop)
            except (OSError, InvalidHandshake, InvalidURI, ConnectionClosed, TimeoutError) as exc:
                self.last_error = "unreachable"
                _log.info("tunnel: coordinator unreachable: %r", exc)
            except ProtocolError as exc:
                self.last_error = exc.code
                _log.warning("tunnel: %s", exc)
            finally:
                self.connected.clear()
            if stop.is_set():
                break
            lived = time.monotonic() - welcomed_at if welcomed_at is not None else 0.0
            session = Session(welcomed_at is not None, lived, progressed=False)
            failures, self.next_delay_s = retry(failures, session, self._backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.next_delay_s)

    async def _handshake(self, ws: ClientConnection) -> None:
        """The control link's mutual handshake, up to ``welcome``."""
        identity = self.identity
        hs = AgentHandshake(
            node_id=identity.node_id,
            public_key=identity.public_key,
            sign=lambda data: crypto.sign(identity.private_key, data),
            verify=crypto.verify,
            pinned_keys=self._backoff.pinned_keys,
            agent_version=self.agent_version,
            nonce=crypto.b64encode(secrets.token_bytes(NONCE_BYTES)),
            last_coordinator_seq=0,
            now=time.monotonic(),
        )
        while True:
            for message in hs.messages_to_send():
                await ws.send(encode_frame(message))
            if hs.state is HandshakeState.OPEN:
                return
            raw = await ws.recv()
            try:
                hs.receive(decode_frame(require_text(raw)), time.monotonic())
            except ProtocolError:
                for message in hs.messages_to_send():
                    await ws.send(encode_frame(message))
                raise

    async def _serve(self, ws: ClientConnection, stop: asyncio.Event) -> None:
        session = _Session(self, ws)
        self._session = session
        stopping = asyncio.create_task(stop.wait())
        serving = asyncio.create_task(session.run())
        try:
            await asyncio.wait({stopping, serving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            serving.cancel()
            await asyncio.gather(stopping, serving, return_exceptions=True)
            await session.end()
            self._session = None
        if serving.done() and not serving.cancelled() and (exc := serving.exception()):
            raise exc


class _Pipe:
    """One stream and its service connection."""

    def __init__(self, stream_id: int, target: str) -> None:
        self.stream_id = stream_id
        self.target = target
        self.readable = asyncio.Event()
        self.conn: ServiceConnection | None = None
        self.eof = False
        self.reset: str | None = None
        self.task: asyncio.Task[None] | None = None


class _Session:
    """One data connection: the machine, its writer, a pipe per stream."""

    def __init__(self, tunnel: ServiceTunnel, ws: ClientConnection) -> None:
        self.tunnel = tunnel
        self.ws = ws
        self.mux = TunnelMux(Role.AGENT, max_streams=tunnel.max_streams)
        self.pipes: dict[int, _Pipe] = {}
        self.waiting: set[_Pipe] = set()
        self.wake = asyncio.Event()

    async def run(self) -> None:
        """Move frames until the connection closes; TunnelError if the coordinator broke
        the rules (the connection is closed with its code)."""
        writer = asyncio.create_task(self._write())
        self.tunnel.connected.set()  # serving: every task of the connection is there
        try:
            async for message in self.ws:
                events = self.mux.receive_data(message)
                failure = self._carry_out(events)
                self.wake.set()
                if failure is not None:
                    await self.ws.close(_CLOSE_POLICY, failure.code)
                    raise failure
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def end(self) -> None:
        """The connection is gone: abort every service connection, and wait for them."""
        tasks = [p.task for p in self.pipes.values() if p.task is not None]
        self._carry_out(list(self.mux.connection_lost()))  # cancels each pipe's task
        await asyncio.gather(*tasks, return_exceptions=True)
        self.pipes.clear()

    def _carry_out(self, events: list[TunnelEvent]) -> TunnelError | None:
        for event in events:
            if isinstance(event, StreamOpened):
                new = _Pipe(event.stream_id, event.target)
                self.pipes[event.stream_id] = new
                new.task = asyncio.create_task(self._serve(new, event.target))
                continue
            if isinstance(event, TunnelFailed):
                return event.error
            pipe = self.pipes.get(event.stream_id)
            if pipe is None:
                continue
            if isinstance(event, StreamReset):
                del self.pipes[event.stream_id]
                pipe.reset = event.code
                if pipe.task is not None:
                    pipe.task.cancel()
            else:
                pipe.eof |= isinstance(event, StreamEnded)
                pipe.readable.set()
        return None

    async def _write(self) -> None:
        writer = MessageWriter(self.ws)
        while True:
            await self.wake.wait()
            self.wake.clear()
            while parts := self.mux.parts_to_send():
                await writer.send(parts)
                self._notify()
            self._notify()
            self.mux.take_finished()  # each pipe forgets itself when its task ends

    def _notify(self) -> None:
        if not self.waiting:
            return
        mux = self.mux
        under = mux.queued <= _QUEUE_BUDGET // 2
        for pipe in [p for p in self.waiting if under or mux.buffered(p.stream_id) <= _HIGH_WATER]:
            self.waiting.discard(pipe)
            if pipe.conn is not None:
                pipe.conn.resume()

    def _reset(self, pipe: _Pipe, code: str) -> None:
        self.mux.reset(pipe.stream_id, code)
        self.pipes.pop(pipe.stream_id, None)
        self.wake.set()

    async def _serve(self, pipe: _Pipe, target: str) -> None:
        """Connect the stream to its target and pump both ways; abort it when reset."""
        try:
            address = await self.tunnel.resolve(target)
        except Exception:  # the daemon's callback: a bug there resets one stream only
            _log.exception("tunnel: resolving %r failed", target)
            address = None
        if address is None:
            self._reset(pipe, ResetCode.UNKNOWN_TARGET)
            return
        sid = pipe.stream_id

        def deliver(data: bytes) -> bool:
            if not self.mux.send(sid, data):
                return False  # reset meanwhile: this task is being cancelled
            self.wake.set()
            if self.mux.buffered(sid) > _HIGH_WATER and self.mux.queued > _QUEUE_BUDGET:
                self.waiting.add(pipe)
                return True
            return False

        def at_eof() -> None:
            self.mux.end(sid)
            self.wake.set()

        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.tunnel.connect_timeout_s):
                transport, conn = await loop.create_connection(
                    lambda: ServiceConnection(deliver, at_eof), *address
                )
        except (OSError, TimeoutError) as exc:
            _log.info("tunnel: %s (%s:%d) refused: %r", target, *address, exc)
            self._reset(pipe, ResetCode.CONNECT_FAILED)
            return
        pipe.conn = conn
        done = False
        writing = asyncio.create_task(self._to_service(pipe, conn))
        try:
            # Over when both ways are: the service's EOF, and the coordinator's END passed
            # on. A failure of either (an OSError) fails the stream.
            await asyncio.wait({writing, conn.finished}, return_when=asyncio.FIRST_EXCEPTION)
            for side in (conn.finished, writing):
                if side.done() and (failure := side.exception()) is not None:
                    raise failure
            done = True
        except OSError as exc:
            _log.info("tunnel: %s failed: %r", target, exc)
            self._reset(pipe, ResetCode.TARGET_ERROR)
        finally:
            writing.cancel()
            await asyncio.gather(writing, return_exceptions=True)
            if not conn.finished.done():
                conn.finished.cancel()
            elif not conn.finished.cancelled():
                conn.finished.exception()  # retrieved: asyncio says nothing of it
            self.waiting.discard(pipe)
            self.pipes.pop(pipe.stream_id, None)
            if done:
                transport.close()
            else:
                transport.abort()  # reset, failed or cancelled: the service sees it

    async def _to_service(self, pipe: _Pipe, conn: ServiceConnection) -> None:
        while True:
            data = self.mux.read(pipe.stream_id, _READ_BYTES)
            if data:
                if self.mux.wants_write:  # a window update due, or the stream finished
                    self.wake.set()
                conn.transport.write(data)
                await conn.drain()
            elif pipe.eof:
                if conn.transport.can_write_eof():
                    conn.transport.write_eof()
                return
            else:
                pipe.readable.clear()
                await pipe.readable.wait()
