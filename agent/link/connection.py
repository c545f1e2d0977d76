"""The agent's connection to its coordinator: handshake, resend, acks, reconnect.

A thin driver around the sans-I/O protocol (``agent.protocol``): it moves frames between
the websocket and the state machines, and between the outbox and the wire. Everything the
agent must deliver is in the outbox first, numbered; a message leaves the outbox only when
the coordinator acknowledges it. After a reconnect the coordinator says which seq it has
stored, and sending resumes right after it, so nothing is lost and nothing duplicated.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from agent.link.identity import Identity
from agent.link.outbox import Outbox
from agent.protocol import crypto
from agent.protocol.connection import AgentConnection
from agent.protocol.errors import ProtocolError
from agent.protocol.events import Acked, Close, Deliver, Event, PeerError, Welcomed
from agent.protocol.limits import MAX_FRAME_BYTES, NONCE_BYTES
from agent.protocol.messages import Message

__all__ = ["Handler", "Link", "LinkConfig", "Session", "client_ssl", "retry"]

_log = logging.getLogger(__name__)
_SEND_BATCH = 64
_ACKS_PER_COMMIT = 64
_ACK_DELAY_S = 0.2
_HANDSHAKE_TIMEOUT_S = 10.0


Handler = Callable[[Message], Awaitable[None]]
"""Handles one reliable coordinator message, in order, once.

A handler whose effects must survive exactly once (a job accepted, its GPUs reserved)
stores them with ``Outbox.append_many(..., coordinator_seq=message.seq)``: what handling
produced and the fact that it was handled commit together. Once it returns, the link
records the seq as handled anyway (for a handler with nothing to store) and acknowledges.
"""


class LinkConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where the coordinator is and how to know it is the right one.

    Attributes:
        url: ``ws://`` or ``wss://host:port/agent``.
        pinned_keys: the coordinator keys this agent trusts, by key id.
        ca_file: a CA bundle to verify a ``wss://`` server certificate against (default:
            the system's).
        backoff_initial_s: the first reconnect delay; it doubles up to ``backoff_max_s``.
        healthy_after_s: a session that lived this long after ``welcome`` counts as one that
            worked, even without progress: the next delay is the first one again.
        ping_interval_s: keepalive pings; a coordinator that stops answering is dropped.
        enrolment_token: presented in ``auth`` to a coordinator that enrols new nodes by
            token (docs/protocol.md, "Admission and quotas"); None: none.
    """

    url: str
    pinned_keys: dict[str, bytes]
    ca_file: Path | None = None
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    healthy_after_s: float = 10.0
    ping_interval_s: float = 20.0
    enrolment_token: str | None = None

    def __repr__(self) -> str:
        # The token is a secret: a configuration that is logged or printed shows its place.
        shown = {name: getattr(self, name) for name in self.__struct_fields__}
        if self.enrolment_token is not None:
            shown["enrolment_token"] = "<hidden>"
        return f"LinkConfig({', '.join(f'{name}={value!r}' for name, value in shown.items())})"


class Session(NamedTuple):
    """How one connection went, as far as the retry policy cares."""

    welcomed: bool
    """It reached ``welcome``."""
    lived_s: float
    """Seconds from ``welcome`` to its end (0 when never welcomed)."""
    progressed: bool
    """The coordinator acknowledged something new of ours: it stored what we sent.

    Handling its messages is not progress: a coordinator that crashes after each
    ``welcome`` would resend the same ones, or new ones, and never be backed off from."""


def client_ssl(config: LinkConfig) -> ssl.SSLContext | None:
    """The TLS context of a ``wss://`` coordinator (None for ``ws://``): its certificate
    and host name verified against ``ca_file`` or the system's roots, so that a man in
    the middle with another certificate is refused before a byte of the protocol."""
    if not config.url.startswith("wss://"):
        return None
    return ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)


def retry(
    failures: int,
    session: Session,
    config: LinkConfig,
    jitter: Callable[[float, float], float] = random.uniform,
) -> tuple[int, float]:
    """The retry policy: failures in a row after ``session``, and the delay before the next.

    A session that was welcomed and then lived ``healthy_after_s`` or made progress worked,
    however it ended (a coordinator killed -9 ends it with an error): the count starts
    again, and the next delay is the first one. Anything else is one more failure: the
    delay doubles from ``backoff_initial_s`` up to ``backoff_max_s``.
    """
    worked = session.welcomed and (session.progressed or session.lived_s >= config.healthy_after_s)
    failures = 0 if worked else failures + 1
    ceiling = min(config.backoff_max_s, config.backoff_initial_s * 2 ** min(failures, 30))
    # Equal jitter (AWS architecture blog): agents cut off together do not return together,
    # and none comes back at once (at least half the ceiling: a dead coordinator's port is
    # not hammered by 10,000 agents retrying within milliseconds).
    return failures, jitter(ceiling / 2, ceiling)


class Link:
    """Keeps one agent connected to its coordinator and its outbox delivered."""

    def __init__(
        self,
        config: LinkConfig,
        identity: Identity,
        outbox: Outbox,
        handler: Handler,
        agent_version: str,
        *,
        profile_digest: str | None = None,
    ) -> None:
        """``profile_digest``: the digest of the profile the handler attests
        (:func:`agent.protocol.dsse.profile_digest`), told in ``hello`` so that a coordinator
        holding a recent verified profile of it need not ask again; None: not told. A
        coordinator older than the digest refuses it as an unknown field: after that the
        link's sessions go without it (attested at each, as that coordinator always asks)."""
        self.config = config
        self.profile_digest = profile_digest
        self.identity = identity
        self.outbox = outbox
        self.handler = handler
        self.agent_version = agent_version
        self.connected = asyncio.Event()
        self.wakeup = asyncio.Event()
        """Set it after appending to the outbox: the sender looks at once, not at its next tick."""
        self.next_delay_s = 0.0
        """The delay chosen before the next connection attempt (status and tests)."""
        self._welcomed_at: float | None = None
        self._progressed = False

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set, reconnecting with backoff (:func:`retry`)."""
        failures = 0
        while not stop.is_set():
            self._welcomed_at, self._progressed = None, False
            try:
                async with connect(
                    self.config.url,
                    max_size=MAX_FRAME_BYTES,
                    ping_interval=self.config.ping_interval_s,
                    open_timeout=_HANDSHAKE_TIMEOUT_S,
                    ssl=self._ssl(),
                ) as websocket:
                    await self._session(websocket, stop)
            except (OSError, InvalidHandshake, InvalidURI, ConnectionClosed, TimeoutError) as exc:
                _log.info("coordinator unreachable: %r", exc)
            except ProtocolError as exc:
                _log.error("coordinator refused or failed the protocol: %s", exc)
            except Exception:
                # A bug or a full disk must cost a reconnect, not the link for good: the
                # daemon would go on sampling into an outbox nobody delivers.
                _log.exception("link failed; reconnecting")
            finally:
                self.connected.clear()
            if stop.is_set():
                break
            welcomed = self._welcomed_at is not None
            lived = time.monotonic() - self._welcomed_at if self._welcomed_at is not None else 0.0
            failures, self.next_delay_s = retry(
                failures, Session(welcomed, lived, self._progressed), self.config
            )
            try:
                await asyncio.wait_for(stop.wait(), self.next_delay_s)
            except TimeoutError:
                continue

    def _ssl(self) -> ssl.SSLContext | None:
        return client_ssl(self.config)

    async def _session(self, websocket: ClientConnection, stop: asyncio.Event) -> None:
        """One connection: handshake, then send and receive until it drops or ``stop``."""
        identity, outbox = self.identity, self.outbox
        conn = AgentConnection(
            node_id=identity.node_id,
            public_key=identity.public_key,
            sign=lambda data: crypto.sign(identity.private_key, data),
            verify=crypto.verify,
            pinned_keys=self.config.pinned_keys,
            agent_version=self.agent_version,
            nonce=crypto.b64encode(secrets.token_bytes(NONCE_BYTES)),
            last_coordinator_seq=outbox.last_coordinator_seq(),
            last_seq=outbox.last_seq(),
            last_acked=outbox.last_acked(),
            now=time.monotonic(),
            enrolment_token=self.config.enrolment_token,
            profile_digest=self.profile_digest,
        )
        writer = _Writer(websocket, conn)
        async with asyncio.timeout(_HANDSHAKE_TIMEOUT_S):
            welcome = await self._handshake(websocket, writer)
        if welcome > outbox.last_acked():
            outbox.ack(welcome)
        self._welcomed_at = time.monotonic()
        self.connected.set()
        _log.info("connected to %s; coordinator has stored up to seq %d", self.config.url, welcome)
        tasks: set[asyncio.Task[Any]] = {
            asyncio.create_task(self._send_pending(writer, welcome)),
            asyncio.create_task(self._receive(websocket, writer)),
            asyncio.create_task(stop.wait()),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            # Let the cancelled ones finish (the receiver applies its last acks) before
            # the caller may close the outbox.
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc

    async def _handshake(self, websocket: ClientConnection, writer: _Writer) -> int:
        """Run the handshake; the last agent seq the coordinator says it stored."""
        while True:
            await writer.flush()
            for event in writer.conn.receive_frame(await websocket.recv(), time.monotonic()):
                if isinstance(event, Close):
                    await writer.flush()
                    self._unless_digest_refused(event.error)
                    raise event.error
                if isinstance(event, Welcomed):
                    return event.welcome.last_agent_seq

    def _unless_digest_refused(self, error: ProtocolError) -> None:
        """Tell no digest from now on if ``error`` is a coordinator refusing it: one from
        before the digest, whose hello had no such field (upgraded after its agents)."""
        if self.profile_digest is not None and "profile_digest" in error.detail:
            _log.warning(
                "%s refused the profile digest in hello (an older coordinator): going"
                " without it; the node is attested at each session",
                self.config.url,
            )
            self.profile_digest = None

    async def _send_pending(self, writer: _Writer, after: int) -> None:
        """Send what the outbox holds after ``after``, in order, then wait for more."""
        sent = after
        while True:
            self.wakeup.clear()
            entries = self.outbox.pending(sent, _SEND_BATCH)
            for entry in entries:
                # One frame at a time: a batch of entries may be large.
                writer.conn.send_reliable(entry.kind, entry.seq, entry.body)
                await writer.flush()
                sent = entry.seq
            if len(entries) < _SEND_BATCH:
                await self.wakeup.wait()

    async def _receive(self, websocket: ClientConnection, writer: _Writer) -> None:
        acks = _AckBatcher(self.outbox)
        try:
            async for frame in websocket:
                for event in writer.conn.receive_frame(frame, time.monotonic()):
                    await self._carry_out(event, writer, acks)
                await writer.flush()
        finally:
            acks.flush()

    async def _carry_out(self, event: Event, writer: _Writer, acks: _AckBatcher) -> None:
        if isinstance(event, Acked):
            acks.note(event.seq)
            self._progressed = True
        elif isinstance(event, Deliver):
            await self.handler(event.message)
            # Recorded once handled (if the handler did not), then acknowledged.
            if self.outbox.last_coordinator_seq() < event.message.seq:
                self.outbox.set_last_coordinator_seq(event.message.seq)
            writer.conn.handled(event.message.seq)
        elif isinstance(event, PeerError):
            _log.warning("coordinator error %s: %s", event.code, event.detail)
        elif isinstance(event, Close):
            await writer.flush()
            raise event.error


class _Writer:
    """Writes what the connection machine queued, one writer at a time, in order."""

    def __init__(self, websocket: ClientConnection, conn: AgentConnection) -> None:
        self.websocket = websocket
        self.conn = conn
        self._lock = asyncio.Lock()

    async def flush(self) -> None:
        """Write every queued frame."""
        async with self._lock:
            for frame in self.conn.frames_to_send():
                await self.websocket.send(frame)


class _AckBatcher:
    """Applies the coordinator's cumulative acks to the outbox in batches.

    Each outbox ack is a synchronous SQLite commit; one per ack would cost the agent more
    than sending. An ack applied late only means a message stays in the outbox a little
    longer: after a reconnect the coordinator's ``welcome`` says what it has stored, and a
    resend is dropped on its side as a duplicate.
    """

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.seq = outbox.last_acked()
        self.noted = 0
        self.flushed_at = time.monotonic()

    def note(self, seq: int) -> None:
        """Record an ack; apply it when enough have come or enough time has passed."""
        self.seq = max(self.seq, seq)
        self.noted += 1
        caught_up = self.seq >= self.outbox.last_seq()  # nothing in flight: apply it now
        if (
            caught_up
            or self.noted >= _ACKS_PER_COMMIT
            or time.monotonic() - self.flushed_at >= _ACK_DELAY_S
        ):
            self.flush()

    def flush(self) -> None:
        """Apply the highest ack seen."""
        if self.seq > self.outbox.last_acked():
            self.outbox.ack(self.seq)
        self.noted = 0
        self.flushed_at = time.monotonic()
