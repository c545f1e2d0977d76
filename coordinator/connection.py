"""One agent's connection: handshake, the two reliable streams, verification, storage.

The protocol logic is :mod:`agent.protocol`'s sans-I/O machines; this module only drives
them over a websocket and writes what they accept to the store. Every protocol error is
answered with a coded ``error``; the connection closes when its class says so.

One exception: a ``profile`` signed by the node's own key whose nonce is expired, unknown or
already answered is not refused. Refusing it would close the connection on a message the
agent's outbox resends after every reconnect, so nothing behind it would ever arrive. It
is stored and acknowledged as unverified, and a fresh ``attest_request`` follows at once.

The coordinator's stream to a node (attest requests, job offers and cancels) is numbered by
one :class:`ReliableSender` per node: the live session's while the node is connected
(:attr:`Shared.sessions`), else rebuilt from the store, which keeps every message until the
node acknowledges it. :func:`deliver` numbers a message, commits it, and sends it at once
if the node is connected; otherwise it goes out after the node's next handshake.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from agent.protocol import crypto, dsse
from agent.protocol.errors import AuthError, DecodeError, ProtocolError
from agent.protocol.limits import NONCE_BYTES
from agent.protocol.messages import (
    AGENT_SENDS,
    Ack,
    AttestRequest,
    AttestRequestBody,
    Error,
    JobCancelBody,
    JobLog,
    JobOfferBody,
    JobResult,
    JobStatus,
    Message,
    NodeStatus,
    Profile,
    ReliableBody,
    ReliableMessage,
    Telemetry,
    decode_frame,
    encode_frame,
    error_message,
    message_type,
)
from agent.protocol.session import (
    CoordinatorHandshake,
    HandshakeState,
    NonceBook,
    ReliableReceiver,
    ReliableSender,
)
from coordinator.jobs_store import JobEvent, VerifiedResult
from coordinator.keys import CoordinatorKey
from coordinator.store import Store, Unverified

__all__ = ["CLOSE_POLICY", "Settings", "Shared", "deliver", "handle"]

_log = logging.getLogger(__name__)

#: RFC 6455 section 7.4.1: 1008 "policy violation", the close code after a closing error.
CLOSE_POLICY = 1008
#: The reliable types an agent sends.
_RELIABLE_IN = (Profile, Telemetry, NodeStatus, JobStatus, JobLog, JobResult)
#: Nonce refusals that leave a node-signed profile stored as unverified, not refused.
_UNVERIFIED_NONCE = frozenset({"stale_nonce", "replayed_nonce"})
#: The body type of each kind of message the coordinator's stream keeps in the store.
_OUTBOUND_BODIES: dict[str, type[ReliableBody]] = {
    "attest_request": AttestRequestBody,
    "job_offer": JobOfferBody,
    "job_cancel": JobCancelBody,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Timing the coordinator asks of agents, and how long its nonces hold."""

    heartbeat_s: float = 15.0
    telemetry_interval_s: float = 1.0
    handshake_timeout_s: float = 30.0
    attest_nonce_ttl_s: float = 3600.0


@dataclass(slots=True, kw_only=True)
class Shared:
    """What every connection of one coordinator shares."""

    key: CoordinatorKey
    store: Store
    nonces: NonceBook
    settings: Settings
    clock: Callable[[], float]
    sessions: dict[str, _Session]
    """The open session of each connected node."""


def _new_nonce() -> str:
    return crypto.b64encode(secrets.token_bytes(NONCE_BYTES))


async def handle(ws: ServerConnection, shared: Shared) -> None:
    """Serve one agent until it goes away or breaks the protocol."""
    try:
        opened = await _handshake(ws, shared)
    except ConnectionClosed:
        return
    if opened is None:
        return
    hs, node_id, sender = opened
    session = _Session(ws, shared, node_id, sender)
    # Registered before any await: from here on, the session's sender numbers the node's
    # stream (deliver() uses it), so that no other sender is built from the store meanwhile.
    shared.sessions[node_id] = session
    try:
        await session.open(hs)
        await session.run()
    except ConnectionClosed:
        pass
    finally:
        if shared.sessions.get(node_id) is session:
            del shared.sessions[node_id]
        session.done.set()


async def deliver(
    shared: Shared, node_id: str, body: ReliableBody, commit: Callable[[int], None]
) -> int:
    """Number ``body`` in the coordinator's stream to ``node_id``, commit it, send it.

    ``commit(seq)`` must store the message (``Store.add_outbound`` or a method that does it
    in the same transaction as what goes with it); if it raises, nothing was numbered. The
    message is sent at once when the node is connected, else after its next handshake.
    Returns its seq.
    """
    session = shared.sessions.get(node_id)
    if session is not None:
        return await session.push(body, commit)
    seq = _sender(shared.store, node_id).next_seq
    commit(seq)
    return seq


async def _send(ws: ServerConnection, messages: list[Message]) -> None:
    for message in messages:
        await ws.send(encode_frame(message))


async def _handshake(
    ws: ServerConnection, shared: Shared
) -> tuple[CoordinatorHandshake, str, ReliableSender] | None:
    """Run the handshake up to ``welcome``; None after refusing the agent.

    Returns the machine (ready to accept), the authenticated node id, and the sender of the
    coordinator's stream to the node, resumed where the agent says it is. Nothing is
    awaited after the sender is built, so the caller can register it before the store
    changes under it.
    """
    key = shared.key
    hs = CoordinatorHandshake(
        key_id=key.key_id,
        sign=key.sign,
        verify=crypto.verify,
        node_id_of=crypto.node_id,
        nonces=shared.nonces,
        new_nonce=_new_nonce,
    )
    while hs.state is not HandshakeState.AUTHENTICATED:
        try:
            async with asyncio.timeout(shared.settings.handshake_timeout_s):
                raw = await ws.recv()
        except TimeoutError:
            await ws.close(CLOSE_POLICY, "handshake timed out")
            return None
        try:
            message = decode_frame(raw, accept=AGENT_SENDS)
        except ProtocolError as exc:
            # During the handshake every error closes (docs/protocol.md, "Handshake").
            await _send(ws, [error_message(exc)])
            await ws.close(CLOSE_POLICY)
            return None
        try:
            hs.receive(message, shared.clock())
        except ProtocolError:
            # The machine queued the error (none when the agent itself sent one).
            await _send(ws, hs.messages_to_send())
            await ws.close(CLOSE_POLICY)
            return None
        await _send(ws, hs.messages_to_send())
    hello = hs.hello
    assert hello is not None
    node_id, store = hello.node_id, shared.store
    known = store.public_key(node_id)
    if known is not None and known != hello.public_key:
        hs.refuse(AuthError("unknown_key", f"{node_id} is registered with another key"))
        await _send(ws, hs.messages_to_send())
        await ws.close(CLOSE_POLICY)
        return None
    # A node has one stream: a newer connection takes over, the older one is closed first
    # so that two receivers never write the same node's seqs at once.
    old = shared.sessions.get(node_id)
    if old is not None:
        await old.ws.close(1000, "superseded by a newer connection")
        await old.done.wait()
    now = shared.clock()
    store.node_seen(node_id, hello.public_key, now)
    store.purge_nonces(now - shared.settings.attest_nonce_ttl_s)
    try:
        sender = _outbound_resume(store, node_id, hello.last_coordinator_seq)
    except ProtocolError as exc:
        hs.refuse(exc)
        await _send(ws, hs.messages_to_send())
        await ws.close(CLOSE_POLICY)
        return None
    return hs, node_id, sender


def _outbound_resume(store: Store, node_id: str, agent_has: int) -> ReliableSender:
    """The sender to a node, its pending messages those after the agent's last stored seq.

    Raises:
        SequenceError: ``ack_ahead`` / ``ack_behind`` (:meth:`ReliableSender.resend_from`).
    """
    sender = _sender(store, node_id)
    sender.resend_from(agent_has)
    if agent_has > store.outbound(node_id).acked:
        store.ack_outbound(node_id, agent_has)
    return sender


def _sender(store: Store, node_id: str) -> ReliableSender:
    """The coordinator's sender to a node, rebuilt from what the store keeps."""
    outbound = store.outbound(node_id)
    sender = ReliableSender(next_seq=outbound.acked + 1)
    for seq, kind, body in outbound.pending:
        # The rows are contiguous after the acked seq: each was numbered by a sender.
        message = sender.send(msgspec.convert(body, _OUTBOUND_BODIES[kind]))
        assert message.seq == seq, f"outbound to {node_id}: seq {seq} after {message.seq - 1}"
    return sender


class _Session:
    """An open session: the agent's stream in, the coordinator's stream out."""

    def __init__(
        self, ws: ServerConnection, shared: Shared, node_id: str, sender: ReliableSender
    ) -> None:
        self.ws = ws
        self.shared = shared
        self.store = shared.store
        self.node_id = node_id
        public_key = crypto.b64decode(self.store.public_key(node_id) or "")
        self.trusted = {crypto.key_id(public_key): public_key}
        self.receiver = ReliableReceiver(self.store.last_agent_seq(node_id))
        self.receiver.resume()
        self.sender = sender
        self.done = asyncio.Event()
        """Set when the session is over, so that a newer connection can take over."""
        self._open = False
        self._sent_seq = 0
        self._send_lock = asyncio.Lock()

    async def open(self, hs: CoordinatorHandshake) -> None:
        """Send ``welcome``, then what the agent has not stored of the coordinator's stream."""
        hs.accept(
            session_id="s-" + secrets.token_hex(8),
            last_agent_seq=self.store.last_agent_seq(self.node_id),
            heartbeat_s=self.shared.settings.heartbeat_s,
            telemetry_interval_s=self.shared.settings.telemetry_interval_s,
        )
        await _send(self.ws, hs.messages_to_send())
        self._open = True
        await self._flush()

    async def run(self) -> None:
        """Ask for a fresh attestation, then take the agent's messages until it leaves."""
        # One request outstanding at a time: a node that reconnects without acknowledging
        # got the pending one again after welcome, and must not pile up new ones.
        if not any(isinstance(m, AttestRequest) for m in self.sender.pending()):
            await self._attest_request()
        async for raw in self.ws:
            ref_seq: int | None = None
            try:
                message = decode_frame(raw, accept=AGENT_SENDS)
                ref_seq = getattr(message, "seq", None)
                await self._on_message(message)
            except ProtocolError as exc:
                await self.ws.send(encode_frame(error_message(exc, ref_seq)))
                if exc.closes:
                    await self.ws.close(CLOSE_POLICY)
                    return

    async def push(self, body: ReliableBody, commit: Callable[[int], None]) -> int:
        """Number ``body``, ``commit(seq)`` it, and send it (see :func:`deliver`).

        A connection that closed meanwhile is no error: the message is stored, and goes
        out after the node's next handshake.
        """
        seq = self.sender.next_seq
        # Stored before it is numbered in memory: a commit that fails leaves no gap, and
        # the agent may acknowledge it after a restart of ours.
        commit(seq)
        message = self.sender.send(body)
        assert message.seq == seq
        try:
            await self._flush()
        except ConnectionClosed:
            kind = message_type(message)
            _log.info("%s: closed; %s %d goes out on the next connection", self.node_id, kind, seq)
        return seq

    async def _flush(self) -> None:
        """Send, in seq order, what is pending and not yet sent in this session."""
        # One flush at a time, and nothing before welcome: the agent sees seqs in order.
        async with self._send_lock:
            if not self._open:
                return
            for message in self.sender.pending():
                if message.seq > self._sent_seq:
                    await self.ws.send(encode_frame(message))
                    self._sent_seq = message.seq

    async def _attest_request(self) -> None:
        nonce = _new_nonce()
        self.store.issue_nonce(self.node_id, nonce, self.shared.clock())
        body = AttestRequestBody(nonce=nonce)
        await self.push(
            body,
            lambda seq: self.store.add_outbound(
                self.node_id, seq, "attest_request", msgspec.to_builtins(body)
            ),
        )

    async def _on_message(self, message: Message) -> None:
        kind = message_type(message)
        if isinstance(message, Ack):
            self.sender.on_ack(message.body.seq)
            self.store.ack_outbound(self.node_id, message.body.seq)
        elif isinstance(message, Error):
            # Never answer an error with an error: that could ping-pong forever.
            _log.info("%s sent error %s: %s", self.node_id, message.body.code, message.body.detail)
        elif isinstance(message, _RELIABLE_IN):
            await self._on_reliable(message)
        else:
            raise DecodeError("unknown_type", f"{kind!r} is a handshake message; session is open")

    async def _on_reliable(self, message: ReliableMessage) -> None:
        if not self.receiver.receive(message):
            # A resend of what is stored: drop it, acknowledge again.
            await self._ack()
            return
        body = msgspec.to_builtins(message.body)
        kind, now = message_type(message), self.shared.clock()
        profile: dict[str, Any] | None = None
        nonce: str | None = None
        unverified: Unverified | None = None
        job: JobEvent | None = None
        if isinstance(message, Profile):
            profile, nonce, unverified = self._verify_profile(body["attestation"], now)
        elif isinstance(message, JobResult):
            # A receipt that does not verify is refused (the connection closes); one that
            # verifies is stored, and what else does not hold is recorded on the job.
            receipt = dsse.verify_receipt(_envelope(body["receipt"]), self.trusted, self.node_id)
            job = VerifiedResult(
                job_id=message.body.job_id, receipt=receipt, envelope=body["receipt"]
            )
        elif isinstance(message, JobStatus | JobLog):
            job = message.body
        added = self.store.add(
            self.node_id,
            message.seq,
            kind,
            body,
            now,
            profile=profile,
            nonce=nonce,
            unverified=unverified,
            job=job,
        )
        # The add committed: only now may the agent forget the message.
        await self._ack()
        if added and unverified is not None:
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
        envelope = _envelope(raw)
        statement = dsse.verify_attestation(envelope, self.trusted, dsse.PROFILE_PREDICATE)
        nonce = statement.predicate.get("nonce")
        if not isinstance(nonce, str):
            raise AuthError("bad_statement", "the predicate has no nonce")
        # Everything but the nonce's freshness first: signature, subject, digest.
        profile = dsse.verify_profile_attestation(envelope, self.trusted, nonce, self.node_id)
        ttl = self.shared.settings.attest_nonce_ttl_s
        try:
            self.store.check_nonce(self.node_id, nonce, now, ttl)
        except AuthError as exc:
            if exc.code not in _UNVERIFIED_NONCE:
                raise
            return profile, None, Unverified(reason=exc.code, detail=exc.detail)
        return profile, nonce, None

    async def _ack(self) -> None:
        ack = self.receiver.take_ack()
        if ack is not None:
            await self.ws.send(encode_frame(ack))


def _envelope(raw: Any) -> dsse.Envelope:
    try:
        return msgspec.convert(raw, dsse.Envelope)
    except msgspec.ValidationError as exc:
        raise DecodeError("bad_message", f"not a DSSE envelope: {exc}") from None
