"""One agent's connection: handshake, the two reliable streams, verification, storage.

The protocol logic is :mod:`agent.protocol`'s sans-I/O machines; this module only drives
them over a websocket and writes what they accept to the store. Every protocol error is
answered with a coded ``error``; the connection closes when its class says so.

One exception: a ``profile`` signed by the node's own key whose nonce is expired, unknown or
already answered is not refused. Refusing it would close the connection on a message the
agent's outbox resends after every reconnect, so nothing behind it would ever arrive. It
is stored and acknowledged as unverified, and a fresh ``attest_request`` follows at once.

The coordinator's stream to a node (attest requests, job offers and cancels) is numbered by
the store as each message is stored (it keeps every one until the node acknowledges it);
the node's open session (:attr:`Shared.sessions`) then sends what it has not sent, in seq
order (:meth:`_Session.catch_up`), whichever coordinator on the database stored it. Jobs go
through :class:`coordinator.job_service.JobService`, out (offers) and in (reports).

A node has one session: a newer one supersedes the older at once (:func:`_take_over`),
which closes with ``superseded`` before the newer is welcomed; one on another coordinator
on the same database is told by the store (:mod:`coordinator.listener`). Each session
holds the node to its frame rate and its storage quota (:mod:`coordinator.admission`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from agent.protocol import crypto, dsse
from agent.protocol.connection import CoordinatorConnection
from agent.protocol.errors import AuthError, DecodeError, LimitExceeded, ProtocolError, SessionEnded
from agent.protocol.events import Acked, Close, Deliver, PeerError
from agent.protocol.messages import (
    AttestRequest,
    AttestRequestBody,
    JobLog,
    JobResult,
    JobStatus,
    Profile,
    ReliableMessage,
    Telemetry,
    message_type,
)
from agent.protocol.reliable import ReliableSender
from coordinator import collector
from coordinator.admission import Settings, Strikes, TokenBucket
from coordinator.compression import receive
from coordinator.group_commit import GroupCommit
from coordinator.handshake import (
    CLOSE_POLICY,
    Gate,
    authenticate,
    check_admission,
    close,
    new_nonce,
    send,
)
from coordinator.job_service import JobService
from coordinator.nodes_store import Unverified
from coordinator.sessions import OpenSessions
from coordinator.store import Message, Store

__all__ = ["CLOSE_POLICY", "CLOSE_SUPERSEDED", "AgentSessions", "Settings", "Shared", "handle"]

_log = logging.getLogger(__name__)

#: RFC 6455 section 7.4.1: 1000 "normal closure", after the ``superseded`` error.
CLOSE_SUPERSEDED = 1000
#: Nonce refusals that leave a node-signed profile stored as unverified, not refused.
_UNVERIFIED_NONCE = frozenset({"stale_nonce", "replayed_nonce"})
#: Seconds between purges of expired attestation nonces.
_PURGE_EVERY_S = 60.0
#: The open session of each connected node.
AgentSessions: TypeAlias = "OpenSessions[_Session]"


@dataclass(slots=True, kw_only=True)
class Shared(Gate):
    """What every connection of one coordinator shares."""

    sessions: AgentSessions
    jobs: JobService
    writer: GroupCommit
    """Where sessions store the agents' messages (but job reports), many to a commit."""
    nonces_purged_at: float = 0.0
    """When expired attestation nonces were last purged (wall time)."""
    coordinator_id: str = field(default_factory=lambda: secrets.token_hex(8))
    """This coordinator among those on one database: what it signs its sessions with."""


async def handle(ws: ServerConnection, shared: Shared) -> None:
    """Serve one agent until it goes away or breaks the protocol."""
    try:
        conn = await authenticate(ws, shared)
        if conn is None:
            return
        session = _take_over(ws, shared, conn)
        if session is None:
            await send(ws, conn.frames_to_send())
            await close(ws, CLOSE_POLICY)
            return
    except ConnectionClosed:
        return
    try:
        await session.open()
        await session.run()
    except ConnectionClosed:
        pass
    finally:
        session.stop_asking()
        shared.sessions.drop(session)
        if shared.store.shared:  # the others count the node connected no more
            node_id, token = session.node_id, session.token
            shared.writer.submit(lambda s: s.presence.closed(node_id, token))
        session.done.set()


def _take_over(
    ws: ServerConnection, shared: Shared, conn: CoordinatorConnection
) -> _Session | None:
    """Make this connection the node's one session; None after refusing it (queued in conn).

    Nothing here awaits: from reading the store to registering the new session no other
    connection runs, so a node never has two sessions, and the one it replaces stops
    storing at once (:meth:`_Session.supersede`), before the new one reads where the
    node's streams stand.
    """
    hello, store = conn.handshake.hello, shared.store
    assert hello is not None
    node_id, now = hello.node_id, shared.clock()
    try:
        if not check_admission(shared, conn.handshake):
            store.nodes.seen(node_id, hello.public_key, now)  # before anything refers to it
        else:  # a node reconnecting: its writes wait for no lock on the loop
            shared.writer.submit(lambda s: s.nodes.seen(node_id, hello.public_key, now))
        agent_has = hello.last_coordinator_seq
        sender, ahead = store.streams.resume_sender(node_id, agent_has)
    except ProtocolError as exc:
        conn.refuse(exc)
        return None
    if ahead:  # the node stored what it had not acknowledged: the sender knows it already
        shared.writer.submit(functools.partial(_forget_acked, node_id=node_id, seq=agent_has))
    if now - shared.nonces_purged_at >= _PURGE_EVERY_S:  # a scan: not at every handshake
        shared.nonces_purged_at = now
        before = now - shared.settings.attest_nonce_ttl_s
        shared.writer.submit(lambda s: s.streams.purge_nonces(before))
    old = shared.sessions.get(node_id)
    if old is not None:
        old.supersede()
    conn.resume(sender, store.nodes.last_agent_seq(node_id))
    session = _Session(ws, shared, node_id, conn, sender, replaces=old)
    shared.sessions.put(session)
    collector.opened()  # a burst of them (a restart's reconnects) is frozen sooner
    if store.shared:
        # Another coordinator on the database holding an older session of the node closes
        # it; the lead's reconciler counts the node connected.
        store.streams.session_opened(node_id, shared.coordinator_id, session.token)
        token, coordinator_id = session.token, shared.coordinator_id
        shared.writer.submit(lambda s: s.presence.opened(node_id, coordinator_id, token, now))
    return session


class _Session:
    """An open session: the agent's stream in, the coordinator's stream out."""

    def __init__(
        self,
        ws: ServerConnection,
        shared: Shared,
        node_id: str,
        conn: CoordinatorConnection,
        sender: ReliableSender,
        *,
        replaces: _Session | None,
    ) -> None:
        self.ws = ws
        self.shared = shared
        self.store = shared.store
        self.node_id = node_id
        # The key the node proved it holds: the one the store has (check_admission).
        public_key = conn.handshake.public_key
        self.trusted = {crypto.key_id(public_key): public_key}
        self.conn = conn
        """The protocol's machine; this session carries out its events."""
        self.sender = sender
        """The machine's sender (:meth:`CoordinatorConnection.resume`): read here, for
        :class:`OpenSessions`; only the machine numbers and acknowledges."""
        self.done = asyncio.Event()
        """Set when the session is over, so that a newer connection can take over."""
        self.superseded = False
        """A newer connection of the node took over: this one stores nothing more."""
        self.token = secrets.token_hex(8)
        """This session among the node's, on every coordinator of the database."""
        self.announced = False
        """The store told this coordinator of this session (:mod:`coordinator.listener`):
        a session of the node announced after it is newer."""
        self._replaces = replaces
        settings = shared.settings
        # The rate carries over from the session this one replaces: reconnecting does not
        # buy a node a fresh burst.
        self._frames: TokenBucket = (
            replaces._frames
            if replaces is not None
            else TokenBucket(settings.frames_per_s, settings.frames_burst, shared.monotonic())
        )
        self._rate_strikes = Strikes(settings.abuse_strikes)
        self._throttled = False
        self._advanced = False
        """Whether the frame being handled stored a new message of the node's stream."""
        self._deflated: bytes | None = None
        """The frame being handled as the DEFLATE stream it came in (None: it did not)."""
        self._quota_strikes = Strikes(settings.abuse_strikes)
        self._send_lock = asyncio.Lock()
        self._ask_at: asyncio.TimerHandle | None = None
        """When the node's verified profile is too old: it is asked to attest again."""
        self._asking: asyncio.Task[None] | None = None

    def supersede(self) -> None:
        """Store nothing more, and give up the node's place: a newer connection takes it."""
        self.superseded = True
        self.shared.sessions.drop(self)

    async def close_superseded(self) -> None:
        """Tell the agent (``superseded``), close, and wait until the session is over."""
        self.conn.fail(SessionEnded("superseded", "a newer connection of this node took over"))
        # Gone already is fine: what matters is that it is closed.
        with contextlib.suppress(ConnectionClosed):
            await self._flush()
        await self.ws.close(CLOSE_SUPERSEDED, "superseded")
        await self.done.wait()

    async def open(self) -> None:
        """Close the session this one replaces; then send ``welcome``, and what the agent
        has not stored of the coordinator's stream."""
        if self._replaces is not None:
            await self._replaces.close_superseded()
            self._replaces = None
        if self.superseded:  # an even newer connection came meanwhile
            return
        self.conn.accept(
            session_id="s-" + secrets.token_hex(8),
            heartbeat_s=self.shared.settings.heartbeat_s,
            telemetry_interval_s=self.shared.settings.telemetry_interval_s,
        )
        await self._flush()

    async def run(self) -> None:
        """Ask for a fresh attestation unless the node's verified profile still stands, then
        take the agent's messages until it leaves."""
        if self.superseded:
            return
        until = self._attested_until()
        if until is None:
            await self._attest_request()
        else:
            self._ask_again(until)
        while True:  # until the connection closes (ConnectionClosed, to handle())
            raw, self._deflated = await receive(self.ws)
            closed = await self._on_frame(raw)
            # Not kept while waiting for the next frame: 10,000 idle sessions would each
            # hold their last ~56 KB frame (and, before, its decoded objects) for 10 s.
            del raw
            self._deflated = None
            if closed:
                return

    async def _on_frame(self, raw: str | bytes) -> bool:
        """Hold one frame to the node's rate, then carry it out; whether the connection closed."""
        if self.superseded:
            # A newer session has read where the streams stand: drop what comes, and go on
            # reading so that the closing handshake gets through.
            return False
        held = await self._hold()
        if self.superseded:
            return False
        self._advanced = False
        if await self._receive(raw):
            return True
        # Over the rate, a frame that moved the stream on was only slowed down (an agent
        # replaying its backlog); anything else (junk, acks, resends) is abuse.
        if held and not self._advanced and self._rate_strikes.strike():
            await close(self.ws, CLOSE_POLICY, "rate_limited")
            return True
        return False

    async def _receive(self, raw: str | bytes) -> bool:
        """Carry out what one frame means; whether the connection is closed."""
        for event in self.conn.receive_frame(raw, self.shared.clock()):
            if isinstance(event, Acked):
                # Through the writer: on the loop's connection it would wait for the
                # writer's group to be written, and the whole loop with it.
                forget = functools.partial(_forget_acked, node_id=self.node_id, seq=event.seq)
                await self.shared.writer.call(forget)
            elif isinstance(event, PeerError):
                _log.info("%s sent error %s: %s", self.node_id, event.code, event.detail)
            elif isinstance(event, Deliver):
                try:
                    await self._on_reliable(event.message)
                except ProtocolError as exc:
                    closes = self.conn.fail(exc, event.message.seq)
                    await self._flush()
                    abuse = exc.code == "quota_exceeded" and self._quota_strikes.strike()
                    if closes or abuse:
                        await close(self.ws, CLOSE_POLICY, exc.code)
                        return True
            elif isinstance(event, Close):
                await self._flush()
                await close(self.ws, CLOSE_POLICY, event.error.code)
                return True
        await self._flush()
        return False

    async def _hold(self) -> bool:
        """Hold the next frame until the node's rate allows it; whether it was held.

        Held, not dropped: a reliable message dropped would leave a gap in the stream. The
        node hears ``rate_limited`` once as it goes over, not for every frame held.
        """
        wait = self._frames.take(self.shared.monotonic())
        if wait == 0.0:
            self._throttled = False
            self._rate_strikes.clear()
            return False
        if not self._throttled:
            self._throttled = True
            rate = self.shared.settings.frames_per_s
            error = LimitExceeded("rate_limited", f"over {rate:g} frames/s: frames are held")
            self.conn.fail(error)
            await self._flush()
        await asyncio.sleep(wait)
        return True

    async def catch_up(self) -> None:
        """Number and send what the store holds for the node past what this session sent.

        Stored before it is numbered in memory: a store that fails leaves no gap, and the
        agent may acknowledge it after a restart of ours. The store numbered it, so a
        message stored by another coordinator on the database takes its place in the
        stream. A connection that closed meanwhile is no error: what was not sent goes out
        after the node's next handshake.
        """
        if self.superseded:
            return
        unsent = self.store.streams.unsent(self.node_id, self.conn.next_seq)
        for seq, body in unsent:
            message = self.conn.send_reliable(body)
            assert message.seq == seq, f"{self.node_id}: stored as {seq}, numbered {message.seq}"
        if not unsent:
            return
        try:
            await self._flush()
        except ConnectionClosed:
            _log.info(
                "%s: closed; seq %d and after go out on the next connection",
                self.node_id,
                unsent[0][0],
            )

    async def _flush(self) -> None:
        """Write what the machine queued, in order (it queues nothing before welcome)."""
        # One flush at a time: the agent sees seqs in order.
        async with self._send_lock:
            await send(self.ws, self.conn.frames_to_send())

    def _attested_until(self) -> float | None:
        """Until when the node's stored verified profile stands for it (wall time); None:
        it attests now.

        It stands when the ``hello`` names its digest (the agent would attest that very
        profile: its hardware has not changed) and it was verified within
        ``attest_max_age_s``. Its key is the one this handshake proved: a node's id names
        its key, and the store holds one key per id. An older agent names no digest, and
        attests at every session as before (docs/protocol.md, "Re-attestation").
        """
        hello = self.conn.handshake.hello
        digest = None if hello is None else hello.profile_digest
        if digest is None:
            return None
        verified = self.store.nodes.profile(self.node_id)
        if verified is None:
            return None
        now, max_age = self.shared.clock(), self.shared.settings.attest_max_age_s
        # A time ahead of the clock (the clock went back) stands for nothing.
        if not now - max_age < verified.verified_at <= now:
            return None
        # The digest its attestation's subject had: the profile as verified is JSON's already.
        if dsse.json_sha256(verified.profile) != digest:
            return None
        return verified.verified_at + max_age

    def _ask_again(self, at: float) -> None:
        """Ask for a fresh attestation at ``at`` (wall time), in place of any time set."""
        if self._ask_at is not None:
            self._ask_at.cancel()
        delay = max(0.0, at - self.shared.clock())
        self._ask_at = asyncio.get_running_loop().call_later(delay, self._ask_now)

    def _ask_now(self) -> None:
        self._ask_at = None
        if self._asking is None or self._asking.done():
            self._asking = asyncio.create_task(self._attest_request())
            self._asking.add_done_callback(_log_failure)

    def stop_asking(self) -> None:
        """The session is over: no more attestation requests from it."""
        if self._ask_at is not None:
            self._ask_at.cancel()
            self._ask_at = None
        if self._asking is not None:
            self._asking.cancel()

    async def _attest_request(self) -> None:
        """Ask for a fresh attestation, unless a request is still unacknowledged."""
        # One request outstanding at a time: a node that reconnects without acknowledging
        # got the pending one again after welcome, and a node that sends profile after
        # stale profile must not pile up requests (and nonces) it never acknowledges.
        if self.superseded:  # the newer session asks for its own
            return
        if any(isinstance(m, AttestRequest) for m in self.conn.pending()):
            return
        nonce = new_nonce()
        body = msgspec.to_builtins(AttestRequestBody(nonce=nonce))
        # Through the writer: on the loop's connection, every reconnecting node's request
        # waited for the writer's group (SQLite's one write lock), and the loop with it. The
        # store numbers it as it commits; catch_up sends from where this session's numbering
        # stands, so a job offer stored meanwhile goes out in its place too.
        await self.shared.writer.call(
            functools.partial(
                _insert_attest_request,
                node_id=self.node_id,
                nonce=nonce,
                now=self.shared.clock(),
                body=body,
            )
        )
        # Superseded meanwhile: catch_up sends nothing here. The newer session numbered the
        # stream as it stood before this commit; its next catch-up (its own request, a job
        # offer) sends this one first, in its place, or the node's next handshake does.
        await self.catch_up()

    async def _on_reliable(self, message: ReliableMessage) -> None:
        kind, now = message_type(message), self.shared.clock()
        unverified: Unverified | None = None
        if isinstance(message, JobStatus | JobLog | JobResult):
            # A receipt that does not verify is refused (the connection closes).
            added = self.shared.jobs.report(self.node_id, message, now)
        else:
            # Telemetry is stored as received (its samples are msgspec.Raw); the rest is small.
            body: Any = message.body
            if not isinstance(message, Telemetry):
                body = msgspec.to_builtins(body)
            profile: dict[str, Any] | None = None
            nonce: str | None = None
            if isinstance(message, Profile):
                profile, nonce, unverified = self._verify_profile(body["attestation"], now)
            # Group commit (:mod:`coordinator.group_commit`): returns once it committed.
            # Telemetry as the DEFLATE stream it came in (its frame's), where it came so.
            deflated = self._deflated if isinstance(message, Telemetry) else None
            added = await self.shared.writer.add(
                Message(
                    self.node_id,
                    message.seq,
                    kind,
                    body,
                    now,
                    profile,
                    nonce,
                    unverified,
                    deflated=deflated,
                )
            )
            if self.superseded:
                # A newer connection took over while it was committed: the newer session
                # read where the stream stands, and the agent's resend there is a duplicate.
                return
        # The add committed: only now may the agent forget the message.
        self._advanced = added != "duplicate"
        self.conn.handled(message.seq)
        await self._flush()
        if added == "shed":
            raise LimitExceeded("quota_exceeded", f"over the storage quota: {kind} shed")
        self._quota_strikes.clear()
        if added == "stored" and isinstance(message, Profile) and unverified is None:
            # Verified now: it stands for the node until it is too old.
            self._ask_again(now + self.shared.settings.attest_max_age_s)
        if added == "stored" and unverified is not None:
            _log.info(
                "%s: profile %d stored unverified (%s: %s); asking again",
                self.node_id,
                message.seq,
                unverified.reason,
                unverified.detail,
            )
            await self._attest_request()

    def _verify_profile(
        self, raw: Any, now: float
    ) -> tuple[dict[str, Any], str | None, Unverified | None]:
        """The profile, the nonce it uses up, and why it is unverified (None: verified).

        Raises:
            AuthError: the envelope is not signed by the node's key, or the statement is not
                a profile of this node (forged or malformed: refused, the connection closes).
        """
        # Everything but the nonce's freshness first (signature, subject, digest), with the
        # signature verified once; then the nonce against what the store issued the node.
        nonce, profile = dsse.verify_profile(_envelope(raw), self.trusted, self.node_id)
        ttl = self.shared.settings.attest_nonce_ttl_s
        try:
            self.store.streams.check_nonce(self.node_id, nonce, now, ttl)
        except AuthError as exc:
            if exc.code not in _UNVERIFIED_NONCE:
                raise
            return profile, None, Unverified(reason=exc.code, detail=exc.detail)
        return profile, nonce, None


def _log_failure(task: asyncio.Task[None]) -> None:
    """A request asked from a timer failed: say so (a closed connection is no failure: the
    node's next session asks)."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, ConnectionClosed):
        _log.error("attestation request failed", exc_info=exc)


def _forget_acked(store: Store, *, node_id: str, seq: int) -> None:
    store.streams.forget_acked(node_id, seq)


def _insert_attest_request(store: Store, *, node_id: str, nonce: str, now: float, body: Any) -> int:
    return store.streams.insert_attest_request(node_id, nonce, now, body)


def _envelope(raw: Any) -> dsse.Envelope:
    try:
        return msgspec.convert(raw, dsse.Envelope)
    except msgspec.ValidationError as exc:
        raise DecodeError("bad_message", f"not a DSSE envelope: {exc}") from None
