"""Sans-I/O state machines of a connection: the mutual handshake and the reliable streams.

As in websockets' ``protocol.py``, nothing here touches a socket, a clock or a random
source: a driver feeds in each received message with the time it arrived, takes out the
messages to send, and closes the connection when told to. Signing, verification, node id
derivation and nonces are handed in, so this module needs no crypto library. The reliable
streams' machines live in :mod:`agent.protocol.reliable` and are re-exported here.

Handshake (docs/protocol.md, "Handshake")::

    agent                                   coordinator
      hello(node_id, public_key, agent_nonce) ->
                <- challenge(coordinator_nonce, key_id, sig_coordinator)
      auth(sig_agent)                       ->
                <- welcome(session_id, last_agent_seq)   or   error + close
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable, Iterable, Mapping

from agent.protocol.errors import AuthError, DecodeError, ProtocolError
from agent.protocol.limits import DEFAULT_NONCE_TTL_S, PROTOCOL_VERSION
from agent.protocol.messages import (
    Auth,
    AuthBody,
    Challenge,
    ChallengeBody,
    Error,
    Hello,
    HelloBody,
    Message,
    Welcome,
    WelcomeBody,
    auth_signed_bytes,
    challenge_signed_bytes,
    error_message,
    message_type,
)
from agent.protocol.reliable import ReliableReceiver, ReliableSender

__all__ = [
    "AgentHandshake",
    "CoordinatorHandshake",
    "HandshakeState",
    "NodeIdOf",
    "NonceBook",
    "ReliableReceiver",
    "ReliableSender",
    "Sign",
    "Verify",
]

#: Signs bytes with this side's private key; returns the raw 64-byte Ed25519 signature.
Sign = Callable[[bytes], bytes]
#: ``verify(public_key, data, signature)``: whether the signature holds; never raises.
Verify = Callable[[bytes, bytes, bytes], bool]
#: The node id that a raw public key names.
NodeIdOf = Callable[[bytes], str]


class HandshakeState(enum.Enum):
    """Where a handshake stands."""

    HELLO_SENT = "hello_sent"
    AWAIT_HELLO = "await_hello"
    CHALLENGE_SENT = "challenge_sent"
    AUTH_SENT = "auth_sent"
    AUTHENTICATED = "authenticated"
    OPEN = "open"
    FAILED = "failed"


class NonceBook:
    """Nonces seen in the last ``ttl_s`` seconds, each usable once; shared by a server."""

    def __init__(self, ttl_s: float = DEFAULT_NONCE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._expiry: dict[str, float] = {}  # insertion order is expiry order

    def use(self, nonce: str, now: float) -> None:
        """Record a nonce; AuthError ``replayed_nonce`` if it was used within the TTL."""
        self._purge(now)
        if nonce in self._expiry:
            raise AuthError("replayed_nonce", "this nonce was already used")
        self._expiry[nonce] = now + self.ttl_s

    def check_fresh(self, issued_at: float, now: float) -> None:
        """AuthError ``stale_nonce`` if a nonce issued at ``issued_at`` has expired."""
        if now - issued_at > self.ttl_s:
            raise AuthError("stale_nonce", f"answered after {now - issued_at:.1f} s")

    def __len__(self) -> int:
        return len(self._expiry)

    def _purge(self, now: float) -> None:
        # Forgetting an expired nonce is safe: a replayed hello only earns a challenge over
        # a fresh coordinator nonce, which the replayer cannot sign.
        while self._expiry:
            nonce, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                return
            del self._expiry[nonce]


class _Handshake:
    """What both sides share: the outgoing queue, the state, refusing and failing."""

    def __init__(self, state: HandshakeState) -> None:
        self.state = state
        self._outgoing: list[Message] = []

    def messages_to_send(self) -> list[Message]:
        """The messages to send now, oldest first; each is returned once."""
        out, self._outgoing = self._outgoing, []
        return out

    def _expect(self, message: Message, expected: type[Message]) -> None:
        if self.state in (HandshakeState.OPEN, HandshakeState.FAILED):
            raise RuntimeError(f"handshake is over ({self.state.value})")
        if isinstance(message, Error):
            # The peer has refused us: do not answer its error with another one.
            self.state = HandshakeState.FAILED
            body = message.body
            raise AuthError("handshake_refused", f"peer answered {body.code}: {body.detail}")
        if not isinstance(message, expected):
            want = expected.__struct_config__.tag
            raise self._fail(
                AuthError("handshake_required", f"expected {want}, got {message_type(message)}")
            )

    def _fail(self, error: ProtocolError) -> ProtocolError:
        """Queue the ``error`` for the peer and fail; the caller raises what it returns."""
        self._outgoing.append(error_message(error))
        self.state = HandshakeState.FAILED
        return error


class AgentHandshake(_Handshake):
    """The agent's side: sends ``hello``, checks the coordinator against its pinned keys.

    Raises from :meth:`receive` (after queueing an ``error`` for the coordinator) when the
    coordinator cannot prove it holds a pinned key; the driver then sends and closes.
    """

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
        now: float,
        nonce_ttl_s: float = DEFAULT_NONCE_TTL_S,
        protocol_versions: Iterable[int] = (PROTOCOL_VERSION,),
        enrolment_token: str | None = None,
        profile_digest: str | None = None,
    ) -> None:
        super().__init__(HandshakeState.HELLO_SENT)
        self._enrolment_token = enrolment_token
        self._sign = sign
        self._verify = verify
        self._pinned = dict(pinned_keys)
        self._nonces = NonceBook(nonce_ttl_s)
        self._sent_at = now
        self.hello = HelloBody(
            node_id=node_id,
            public_key=_b64(public_key),
            agent_version=agent_version,
            protocol_versions=list(protocol_versions),
            agent_nonce=nonce,
            last_coordinator_seq=last_coordinator_seq,
            profile_digest=profile_digest,
        )
        self.challenge: ChallengeBody | None = None
        self.welcome: WelcomeBody | None = None
        self._outgoing.append(Hello(v=PROTOCOL_VERSION, body=self.hello))

    def receive(self, message: Message, now: float) -> None:
        """Take the coordinator's next handshake message."""
        if self.state is HandshakeState.HELLO_SENT:
            self._expect(message, Challenge)
            assert isinstance(message, Challenge)
            self._on_challenge(message.body, now)
        else:
            self._expect(message, Welcome)
            assert isinstance(message, Welcome)
            self.welcome = message.body
            self.state = HandshakeState.OPEN

    def _on_challenge(self, challenge: ChallengeBody, now: float) -> None:
        hello = self.hello
        try:
            self._nonces.check_fresh(self._sent_at, now)
            key = self._pinned.get(challenge.key_id)
            if key is None:
                raise AuthError("untrusted_key", f"{challenge.key_id!r} is not pinned")
            signed = challenge_signed_bytes(
                hello.agent_nonce, challenge.coordinator_nonce, hello.node_id
            )
            if not self._verify(key, signed, _unb64(challenge.signature)):
                raise AuthError("bad_signature", "challenge does not verify with the pinned key")
        except ProtocolError as exc:
            raise self._fail(exc) from None
        self.challenge = challenge
        signed = auth_signed_bytes(
            hello.agent_nonce, challenge.coordinator_nonce, hello.node_id, challenge.key_id
        )
        body = AuthBody(signature=_b64(self._sign(signed)), enrolment_token=self._enrolment_token)
        self._outgoing.append(Auth(v=PROTOCOL_VERSION, body=body))
        self.state = HandshakeState.AUTH_SENT


class CoordinatorHandshake(_Handshake):
    """The coordinator's side: challenges the agent, verifies its ``auth``.

    Once :attr:`state` is ``AUTHENTICATED``, :attr:`hello` names a node that proved it holds
    its key; the driver then calls :meth:`accept` (or :meth:`refuse`).
    """

    def __init__(
        self,
        *,
        key_id: str,
        sign: Sign,
        verify: Verify,
        node_id_of: NodeIdOf,
        nonces: NonceBook,
        new_nonce: Callable[[], str],
    ) -> None:
        super().__init__(HandshakeState.AWAIT_HELLO)
        self.key_id = key_id
        self._sign = sign
        self._verify = verify
        self._node_id_of = node_id_of
        self._nonces = nonces
        self._new_nonce = new_nonce
        self.hello: HelloBody | None = None
        self.enrolment_token: str | None = None
        """The token the agent presented in ``auth`` (None: none)."""
        self.public_key = b""
        self._coordinator_nonce = ""
        self._challenged_at = 0.0

    def receive(self, message: Message, now: float) -> None:
        """Take the agent's next handshake message."""
        if self.state is HandshakeState.AUTHENTICATED:
            raise RuntimeError("handshake awaits accept() or refuse()")
        if self.state is HandshakeState.AWAIT_HELLO:
            self._expect(message, Hello)
            assert isinstance(message, Hello)
            try:
                self._on_hello(message.body, now)
            except ProtocolError as exc:
                raise self._fail(exc) from None
        else:
            self._expect(message, Auth)
            assert isinstance(message, Auth)
            try:
                self._on_auth(message.body, now)
            except ProtocolError as exc:
                raise self._fail(exc) from None

    def accept(
        self,
        *,
        session_id: str,
        last_agent_seq: int,
        heartbeat_s: float,
        telemetry_interval_s: float,
    ) -> None:
        """Open the session: queue ``welcome``."""
        if self.state is not HandshakeState.AUTHENTICATED:
            raise RuntimeError(f"cannot accept in state {self.state.value}")
        body = WelcomeBody(
            session_id=session_id,
            last_agent_seq=last_agent_seq,
            heartbeat_s=heartbeat_s,
            telemetry_interval_s=telemetry_interval_s,
        )
        self._outgoing.append(Welcome(v=PROTOCOL_VERSION, body=body))
        self.state = HandshakeState.OPEN

    def refuse(self, error: ProtocolError) -> None:
        """Refuse the agent: queue the ``error``; the driver sends it and closes."""
        self._fail(error)

    def _on_hello(self, hello: HelloBody, now: float) -> None:
        if PROTOCOL_VERSION not in hello.protocol_versions:
            raise DecodeError("bad_version", f"agent speaks {hello.protocol_versions}")
        public_key = _unb64(hello.public_key)
        if self._node_id_of(public_key) != hello.node_id:
            raise AuthError("node_mismatch", f"{hello.node_id!r} is not named by this key")
        self._nonces.use(hello.agent_nonce, now)
        self.hello, self.public_key = hello, public_key
        self._coordinator_nonce, self._challenged_at = self._new_nonce(), now
        signed = challenge_signed_bytes(hello.agent_nonce, self._coordinator_nonce, hello.node_id)
        body = ChallengeBody(
            coordinator_nonce=self._coordinator_nonce,
            key_id=self.key_id,
            signature=_b64(self._sign(signed)),
        )
        self._outgoing.append(Challenge(v=PROTOCOL_VERSION, body=body))
        self.state = HandshakeState.CHALLENGE_SENT

    def _on_auth(self, auth: AuthBody, now: float) -> None:
        hello = self.hello
        assert hello is not None
        self._nonces.check_fresh(self._challenged_at, now)
        signed = auth_signed_bytes(
            hello.agent_nonce, self._coordinator_nonce, hello.node_id, self.key_id
        )
        if not self._verify(self.public_key, signed, _unb64(auth.signature)):
            raise AuthError("bad_signature", "auth does not verify with the key in hello")
        self.enrolment_token = auth.enrolment_token
        self.state = HandshakeState.AUTHENTICATED


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    # The wire types' patterns admit only well-formed standard base64 of the right length.
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise DecodeError("bad_message", f"bad base64: {exc}") from None
