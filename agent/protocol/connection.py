"""Sans-I/O connections of both sides: handshake, the reliable streams, acks, errors.

As in websockets' ``protocol.py``, a driver feeds each received frame in with the time it
arrived (:meth:`receive_frame`), carries out the events it returns, and writes what
:meth:`frames_to_send` returns; nothing here touches a socket, a clock or a file. Every rule
of a connection lives here: which types each side takes, the handshake
(:mod:`agent.protocol.session`), seq and ack range checks (:mod:`agent.protocol.reliable`),
when to acknowledge, and which errors close.

Events::

    Welcomed(welcome)             agent: the session is open
    Authenticated(hello, token)   coordinator: the node proved its key; accept() or refuse()
    Deliver(message)              a new reliable message: handle it, commit, then handled(seq)
    Acked(seq)                    the peer's cumulative ack moved on to seq
    PeerError(code, detail, ref)  the peer sent an ``error`` (never answered)
    Close(error)                  write frames_to_send() (the coded error, if any), then close

Ack policy: a new message is acknowledged once the application says it is handled (what
it stored and the seq commit together); a duplicate is acknowledged again at once. Acks
are cumulative: one ``ack`` names the highest seq received in order.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping

from agent.protocol.errors import DecodeError, ProtocolError, SequenceError
from agent.protocol.events import (
    Acked,
    Authenticated,
    Close,
    Deliver,
    Event,
    PeerError,
    Welcomed,
)
from agent.protocol.limits import DEFAULT_NONCE_TTL_S, PROTOCOL_VERSION
from agent.protocol.messages import (
    AGENT_SENDS,
    COORDINATOR_SENDS,
    Ack,
    Auth,
    Challenge,
    Error,
    Hello,
    HelloBody,
    Message,
    ReliableBody,
    ReliableMessage,
    Welcome,
    decode_frame,
    encode_frame,
    encode_reliable,
    error_message,
    message_type,
    require_text,
)
from agent.protocol.reliable import ReliableReceiver, ReliableSender
from agent.protocol.session import (
    AgentHandshake,
    CoordinatorHandshake,
    HandshakeState,
    NodeIdOf,
    NonceBook,
    Sign,
    Verify,
)

__all__ = [
    "Acked",
    "AgentConnection",
    "Authenticated",
    "Close",
    "ConnectionState",
    "CoordinatorConnection",
    "Deliver",
    "Event",
    "PeerError",
    "Welcomed",
]


class ConnectionState(enum.Enum):
    """Where a connection stands."""

    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


class _Connection:
    """What both sides share once the session is open."""

    _accept: frozenset[str]

    def __init__(self) -> None:
        self.state = ConnectionState.HANDSHAKE
        self._out: list[str] = []
        self._receiver = ReliableReceiver()
        self._delivered: int | None = None  # handed to the application, not yet handled

    def frames_to_send(self) -> list[str]:
        """The frames to write now, oldest first; each is returned once."""
        out, self._out = self._out, []
        return out

    def receive_frame(self, frame: str | bytes, now: float) -> list[Event]:
        """Take one frame (``bytes``: a binary frame, refused) that arrived at ``now``."""
        if self.state is ConnectionState.CLOSED:
            return []
        if self._delivered is not None:
            raise RuntimeError(f"seq {self._delivered} was delivered and not handled")
        if self.state is ConnectionState.HANDSHAKE:
            return self._receive_handshake(frame, now)
        try:
            message = decode_frame(require_text(frame), accept=self._accept)
        except ProtocolError as exc:
            return self._refuse(exc)
        if isinstance(message, Ack):
            try:
                return self._on_ack(message.body.seq)
            except ProtocolError as exc:
                return self._refuse(exc)
        if isinstance(message, Error):
            # Never answer an error with an error: that could ping-pong forever.
            body = message.body
            return [PeerError(body.code, body.detail, body.ref_seq)]
        if isinstance(message, Hello | Challenge | Auth | Welcome):
            kind = message_type(message)
            return self._refuse(
                DecodeError("unknown_type", f"{kind!r} is a handshake message; session is open")
            )
        try:
            new = self._receiver.receive(message)
        except ProtocolError as exc:  # a gap, or a seq going back
            return self._refuse(exc, message.seq)
        if not new:  # a resend of what is stored: drop it, acknowledge again
            self._queue_ack()
            return []
        self._delivered = message.seq
        return [Deliver(message)]

    def handled(self, seq: int) -> None:
        """The application committed delivered message ``seq``: acknowledge it."""
        if seq != self._delivered:
            raise RuntimeError(f"seq {seq} is not the one delivered ({self._delivered})")
        self._delivered = None
        self._queue_ack()

    def fail(self, error: ProtocolError, ref_seq: int | None = None) -> bool:
        """Queue a coded ``error`` for the peer; whether the connection must close now.

        A delivered message that the application refuses with it stays unacknowledged
        until the next acknowledgement covers it.
        """
        self._delivered = None
        if self.state is not ConnectionState.CLOSED:
            self._out.append(encode_frame(error_message(error, ref_seq)))
        if error.closes or self.state is ConnectionState.HANDSHAKE:
            self.state = ConnectionState.CLOSED
            return True
        return False

    def _refuse(self, error: ProtocolError, ref_seq: int | None = None) -> list[Event]:
        return [Close(error)] if self.fail(error, ref_seq) else []

    def _queue_ack(self) -> None:
        ack = self._receiver.take_ack()
        if ack is not None:
            self._out.append(encode_frame(ack))

    def _open(self) -> None:
        self.state = ConnectionState.OPEN
        self._receiver.resume()

    def _queue(self, messages: Iterable[Message]) -> None:
        self._out.extend(encode_frame(message) for message in messages)

    def _receive_handshake(self, frame: str | bytes, now: float) -> list[Event]:
        raise NotImplementedError

    def _on_ack(self, seq: int) -> list[Event]:
        raise NotImplementedError


class AgentConnection(_Connection):
    """The agent's side. Its stream is numbered by a durable outbox, not by this machine:
    :meth:`send_reliable` frames an outbox entry, body already encoded.

    Args:
        last_seq: the last seq the outbox numbered; an ack past it (or past what was sent
            since) is ``ack_ahead``.
        last_acked: the last seq the outbox has as acknowledged; a ``welcome`` below it is
            ``ack_behind`` (the coordinator lost what it acknowledged).
        last_coordinator_seq: the last seq of the coordinator's stream handled.
        The others: as :class:`~agent.protocol.session.AgentHandshake`.
    """

    _accept = COORDINATOR_SENDS

    def __init__(
        self,
        *,
        node_id: str,
        public_key: bytes,
        sign: Sign,
        verify: Verify,
        pinned_keys: Mapping[str, bytes],
        agent_version: str,
        nonce: str,
        last_coordinator_seq: int,
        last_seq: int,
        last_acked: int,
        now: float,
        nonce_ttl_s: float = DEFAULT_NONCE_TTL_S,
        enrolment_token: str | None = None,
        profile_digest: str | None = None,
    ) -> None:
        super().__init__()
        self._handshake = AgentHandshake(
            node_id=node_id,
            public_key=public_key,
            sign=sign,
            verify=verify,
            pinned_keys=pinned_keys,
            agent_version=agent_version,
            nonce=nonce,
            last_coordinator_seq=last_coordinator_seq,
            now=now,
            nonce_ttl_s=nonce_ttl_s,
            protocol_versions=(PROTOCOL_VERSION,),
            enrolment_token=enrolment_token,
            profile_digest=profile_digest,
        )
        self._receiver = ReliableReceiver(last_coordinator_seq)
        self._queue(self._handshake.messages_to_send())
        self._sent = last_seq  # the highest seq an ack may name
        self._acked = last_acked
        self.progressed = False
        """The coordinator acknowledged something new of ours after ``welcome``."""

    def send_reliable(self, kind: str, seq: int, body: bytes) -> None:
        """Queue the frame of outbox entry ``seq``; entries go in seq order.

        Raises:
            LimitExceeded: ``frame_too_large``: the coordinator would refuse it.
        """
        if self.state is ConnectionState.HANDSHAKE:
            raise RuntimeError("cannot send before welcome")
        if self.state is ConnectionState.CLOSED:
            return  # nothing goes out after the closing error; the outbox keeps it
        self._out.append(encode_reliable(kind, seq, body))
        self._sent = max(self._sent, seq)

    def _receive_handshake(self, frame: str | bytes, now: float) -> list[Event]:
        try:
            # Every type is decoded: the handshake names one out of place.
            self._handshake.receive(decode_frame(require_text(frame)), now)
        except ProtocolError as exc:
            # The handshake queued its own error (none when the coordinator sent one).
            if self._handshake.state is HandshakeState.FAILED:
                self._queue(self._handshake.messages_to_send())
                self.state = ConnectionState.CLOSED
                return [Close(exc)]
            return self._refuse(exc)  # not a message at all: every error closes here
        self._queue(self._handshake.messages_to_send())
        welcome = self._handshake.welcome
        if welcome is None:
            return []
        stored = welcome.last_agent_seq
        if not self._acked <= stored <= self._sent:
            # Stored more than was ever sent, or less than it acknowledged (a restored
            # database): either way resending cannot make the streams agree.
            code = "ack_ahead" if stored > self._sent else "ack_behind"
            detail = f"coordinator has seq {stored}; sent up to {self._sent}, acked {self._acked}"
            return self._refuse(SequenceError(code, detail))
        self._acked = stored
        self._open()
        return [Welcomed(welcome)]

    def _on_ack(self, seq: int) -> list[Event]:
        if seq > self._sent:
            raise SequenceError("ack_ahead", f"ack {seq}, last sent {self._sent}")
        if seq <= self._acked:  # an older cumulative ack says nothing new
            return []
        self._acked = seq
        self.progressed = True
        return [Acked(seq)]


class CoordinatorConnection(_Connection):
    """The coordinator's side. Its stream to the node is a :class:`ReliableSender` the
    driver rebuilds from its store and hands in with :meth:`resume`.

    Args:
        check_hello: refuses a ``hello`` (raises a ProtocolError) before any signing is
            spent on it: the coordinator's admission checks that need no proof of the key.
        The others: as :class:`~agent.protocol.session.CoordinatorHandshake`.
    """

    _accept = AGENT_SENDS

    def __init__(
        self,
        *,
        key_id: str,
        sign: Sign,
        verify: Verify,
        node_id_of: NodeIdOf,
        nonces: NonceBook,
        new_nonce: Callable[[], str],
        check_hello: Callable[[HelloBody], None] | None = None,
    ) -> None:
        super().__init__()
        self.handshake = CoordinatorHandshake(
            key_id=key_id,
            sign=sign,
            verify=verify,
            node_id_of=node_id_of,
            nonces=nonces,
            new_nonce=new_nonce,
        )
        self._check_hello = check_hello
        self._sender: ReliableSender | None = None
        self._last_agent_seq = 0

    @property
    def authenticated(self) -> bool:
        """The node proved its key; the connection awaits :meth:`accept` or :meth:`refuse`."""
        return self.handshake.state is HandshakeState.AUTHENTICATED

    @property
    def next_seq(self) -> int:
        """The seq the next :meth:`send_reliable` gets."""
        return self._stream().next_seq

    def resume(self, sender: ReliableSender, last_agent_seq: int) -> None:
        """Where the two streams stand, as stored: before :meth:`accept`."""
        self._sender = sender
        self._last_agent_seq = last_agent_seq
        self._receiver = ReliableReceiver(last_agent_seq)

    def accept(self, *, session_id: str, heartbeat_s: float, telemetry_interval_s: float) -> None:
        """Open the session: queue ``welcome``, then what the node has not acknowledged."""
        self.handshake.accept(
            session_id=session_id,
            last_agent_seq=self._last_agent_seq,
            heartbeat_s=heartbeat_s,
            telemetry_interval_s=telemetry_interval_s,
        )
        self._queue(self.handshake.messages_to_send())
        self._open()
        self._queue(self._stream().pending())

    def refuse(self, error: ProtocolError) -> None:
        """Refuse the authenticated node: queue the ``error``; the driver writes and closes."""
        self.handshake.refuse(error)
        self._queue(self.handshake.messages_to_send())
        self.state = ConnectionState.CLOSED

    def send_reliable(self, body: ReliableBody) -> ReliableMessage:
        """Number ``body`` and keep it until acknowledged; queued at once if open, else
        after ``welcome``. The driver stores it under :attr:`next_seq` first."""
        message = self._stream().send(body)
        if self.state is ConnectionState.OPEN:
            self._queue([message])
        return message

    def pending(self) -> list[ReliableMessage]:
        """Sent and not yet acknowledged, in seq order."""
        return self._stream().pending()

    def _stream(self) -> ReliableSender:
        if self._sender is None:
            raise RuntimeError("resume() first")
        return self._sender

    def _receive_handshake(self, frame: str | bytes, now: float) -> list[Event]:
        hs = self.handshake
        if hs.state is HandshakeState.AUTHENTICATED:
            raise RuntimeError("the handshake awaits accept() or refuse()")
        try:
            message = decode_frame(require_text(frame), accept=self._accept)
            if isinstance(message, Hello) and self._check_hello is not None:
                self._check_hello(message.body)
        except ProtocolError as exc:
            return self._refuse(exc)  # during the handshake every error closes
        try:
            hs.receive(message, now)
        except ProtocolError as exc:
            # The handshake queued its error (none when the agent itself sent one).
            self._queue(hs.messages_to_send())
            self.state = ConnectionState.CLOSED
            return [Close(exc)]
        self._queue(hs.messages_to_send())
        if self.authenticated:
            assert hs.hello is not None
            return [Authenticated(hs.hello, hs.enrolment_token)]
        return []

    def _on_ack(self, seq: int) -> list[Event]:
        sender = self._stream()
        before = sender.acked_seq
        sender.on_ack(seq)  # SequenceError ack_ahead past what was numbered
        return [Acked(seq)] if sender.acked_seq > before else []
