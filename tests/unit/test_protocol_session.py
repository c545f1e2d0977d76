"""The handshake state machines, both sides wired together in memory, with real Ed25519."""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections.abc import Callable

import msgspec
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.protocol.errors import AuthError, DecodeError
from agent.protocol.messages import (
    Auth,
    AuthBody,
    Challenge,
    Error,
    Hello,
    Message,
    TelemetryBody,
    decode_frame,
    encode_frame,
    wrap,
)
from agent.protocol.session import AgentHandshake, CoordinatorHandshake, HandshakeState, NonceBook

TTL = 30.0


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def node_id_of(public_key: bytes) -> str:
    return "node-" + hashlib.sha256(public_key).hexdigest()[:26]


def nonces() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: base64.b64encode(next(counter).to_bytes(32, "big")).decode()


AGENT_KEY = Ed25519PrivateKey.generate()
COORD_KEY = Ed25519PrivateKey.generate()
COORD_KEY_ID = "ed25519:coord"


def agent(
    *,
    pinned: dict[str, bytes] | None = None,
    nonce: int = 1,
    now: float = 0.0,
    key: Ed25519PrivateKey = AGENT_KEY,
) -> AgentHandshake:
    return AgentHandshake(
        node_id=node_id_of(raw(key)),
        public_key=raw(key),
        sign=key.sign,
        verify=verify,
        pinned_keys={COORD_KEY_ID: raw(COORD_KEY)} if pinned is None else pinned,
        agent_version="0.1.0",
        nonce=base64.b64encode(bytes([nonce]) * 32).decode(),
        last_coordinator_seq=7,
        now=now,
    )


def coordinator(
    book: NonceBook | None = None, key: Ed25519PrivateKey = COORD_KEY
) -> CoordinatorHandshake:
    return CoordinatorHandshake(
        key_id=COORD_KEY_ID,
        sign=key.sign,
        verify=verify,
        node_id_of=node_id_of,
        nonces=NonceBook(TTL) if book is None else book,
        new_nonce=nonces(),
    )


def over_the_wire(messages: list[Message]) -> list[Message]:
    # Every message crosses as text, so the encoding is part of what is tested.
    return [decode_frame(encode_frame(m)) for m in messages]


def one(messages: list[Message]) -> Message:
    [message] = over_the_wire(messages)
    return message


def test_handshake_opens_both_sides() -> None:
    a, c = agent(), coordinator()
    c.receive(one(a.messages_to_send()), now=1.0)
    a.receive(one(c.messages_to_send()), now=1.1)
    c.receive(one(a.messages_to_send()), now=1.2)
    assert c.state is HandshakeState.AUTHENTICATED
    assert c.hello is not None
    assert c.hello.node_id == node_id_of(raw(AGENT_KEY))
    assert c.hello.last_coordinator_seq == 7
    assert c.public_key == raw(AGENT_KEY)
    c.accept(session_id="s-1", last_agent_seq=41, heartbeat_s=15, telemetry_interval_s=1)
    a.receive(one(c.messages_to_send()), now=1.3)
    assert {a.state, c.state} == {HandshakeState.OPEN}
    assert a.welcome is not None
    assert a.welcome.last_agent_seq == 41
    assert a.messages_to_send() == c.messages_to_send() == []


def refused_with(code: str, raised: pytest.ExceptionInfo[AuthError], queued: list[Message]) -> None:
    assert raised.value.code == code
    [error] = over_the_wire(queued)
    assert isinstance(error, Error)
    assert error.body.code == code


def test_agent_refuses_a_forged_challenge_signature() -> None:
    a, c = agent(), coordinator()
    c.receive(one(a.messages_to_send()), now=1.0)
    challenge = one(c.messages_to_send())
    assert isinstance(challenge, Challenge)
    forged = base64.b64encode(bytes(64)).decode()
    tampered = Challenge(v=1, body=msgspec.structs.replace(challenge.body, signature=forged))
    with pytest.raises(AuthError) as raised:
        a.receive(tampered, now=1.1)
    refused_with("bad_signature", raised, a.messages_to_send())
    assert a.state is HandshakeState.FAILED


def test_agent_refuses_a_coordinator_without_the_pinned_key() -> None:
    a, impostor = agent(), coordinator(key=Ed25519PrivateKey.generate())
    impostor.receive(one(a.messages_to_send()), now=1.0)
    with pytest.raises(AuthError) as raised:
        a.receive(one(impostor.messages_to_send()), now=1.1)
    refused_with("bad_signature", raised, a.messages_to_send())


def test_agent_refuses_a_key_id_it_did_not_pin() -> None:
    a, c = agent(pinned={"ed25519:other": raw(COORD_KEY)}), coordinator()
    c.receive(one(a.messages_to_send()), now=1.0)
    with pytest.raises(AuthError) as raised:
        a.receive(one(c.messages_to_send()), now=1.1)
    refused_with("untrusted_key", raised, a.messages_to_send())


def test_agent_refuses_a_challenge_after_its_nonce_expired() -> None:
    a, c = agent(now=0.0), coordinator()
    c.receive(one(a.messages_to_send()), now=1.0)
    with pytest.raises(AuthError) as raised:
        a.receive(one(c.messages_to_send()), now=TTL + 0.1)
    refused_with("stale_nonce", raised, a.messages_to_send())


def test_coordinator_refuses_a_replayed_hello_nonce() -> None:
    book = NonceBook(TTL)
    hello = one(agent(nonce=5).messages_to_send())
    coordinator(book).receive(hello, now=1.0)
    again = coordinator(book)
    with pytest.raises(AuthError) as raised:
        again.receive(hello, now=2.0)
    refused_with("replayed_nonce", raised, again.messages_to_send())
    assert again.state is HandshakeState.FAILED


def test_nonce_book_forgets_nonces_once_they_expire() -> None:
    book = NonceBook(TTL)
    book.use("n1", now=0.0)
    book.use("n2", now=10.0)
    book.use("n3", now=TTL + 5)
    assert len(book) == 2


def test_coordinator_refuses_an_auth_after_its_nonce_expired() -> None:
    a, c = agent(now=0.0), coordinator()
    c.receive(one(a.messages_to_send()), now=0.0)
    a.receive(one(c.messages_to_send()), now=0.1)
    with pytest.raises(AuthError) as raised:
        c.receive(one(a.messages_to_send()), now=TTL + 0.1)
    refused_with("stale_nonce", raised, c.messages_to_send())


def test_coordinator_refuses_a_node_id_its_key_does_not_name() -> None:
    other = Ed25519PrivateKey.generate()
    a = agent(key=AGENT_KEY)
    hello = one(a.messages_to_send())
    assert isinstance(hello, Hello)
    claimed = msgspec.structs.replace(hello.body, node_id=node_id_of(raw(other)))
    c = coordinator()
    with pytest.raises(AuthError) as raised:
        c.receive(wrap(claimed), now=1.0)
    refused_with("node_mismatch", raised, c.messages_to_send())


def test_coordinator_refuses_an_auth_with_a_bad_signature() -> None:
    a, c = agent(), coordinator()
    c.receive(one(a.messages_to_send()), now=1.0)
    a.receive(one(c.messages_to_send()), now=1.1)
    a.messages_to_send()
    # A signature by the right key over other bytes: a replayed auth from another session.
    stolen = AGENT_KEY.sign(b"another session")
    with pytest.raises(AuthError) as raised:
        c.receive(Auth(v=1, body=AuthBody(signature=base64.b64encode(stolen).decode())), now=1.2)
    refused_with("bad_signature", raised, c.messages_to_send())


def test_coordinator_refuses_an_agent_signing_for_another_key() -> None:
    # The agent's hello names one key; its auth is signed by another.
    a, c = agent(), coordinator()
    c.receive(one(a.messages_to_send()), now=1.0)
    a._sign = Ed25519PrivateKey.generate().sign
    a.receive(one(c.messages_to_send()), now=1.1)
    with pytest.raises(AuthError) as raised:
        c.receive(one(a.messages_to_send()), now=1.2)
    refused_with("bad_signature", raised, c.messages_to_send())


def test_coordinator_refuses_an_agent_without_its_protocol_version() -> None:
    hello = one(agent().messages_to_send())
    assert isinstance(hello, Hello)
    c = coordinator()
    with pytest.raises(DecodeError) as raised:
        c.receive(wrap(msgspec.structs.replace(hello.body, protocol_versions=[2, 3])), now=1.0)
    assert raised.value.code == "bad_version"
    assert c.state is HandshakeState.FAILED


def test_anything_but_hello_first_is_handshake_required() -> None:
    c = coordinator()
    with pytest.raises(AuthError) as raised:
        c.receive(wrap(TelemetryBody(samples=[]), 1), now=1.0)
    refused_with("handshake_required", raised, c.messages_to_send())


def test_a_refusal_from_the_peer_fails_the_handshake_without_an_answer() -> None:
    a, c = agent(), coordinator()
    hello = one(a.messages_to_send())
    c.receive(hello, now=1.0)
    c.messages_to_send()
    c.refuse(AuthError("unknown_key", "not enrolled"))
    with pytest.raises(AuthError) as raised:
        a.receive(one(c.messages_to_send()), now=1.1)
    assert raised.value.code == "handshake_refused"
    assert "unknown_key" in raised.value.detail
    assert a.messages_to_send() == []
    assert a.state is HandshakeState.FAILED


def test_accept_before_authentication_is_a_driver_bug() -> None:
    with pytest.raises(RuntimeError):
        coordinator().accept(
            session_id="s", last_agent_seq=0, heartbeat_s=1, telemetry_interval_s=1
        )


def test_hello_names_the_profile_digest_only_when_the_agent_gives_one() -> None:
    # Without one, hello is the frame an older coordinator knows: no new key in it.
    [plain] = agent().messages_to_send()
    assert "profile_digest" not in msgspec.json.decode(encode_frame(plain))["body"]
    digest = hashlib.sha256(b"profile").hexdigest()
    named = AgentHandshake(
        node_id=node_id_of(raw(AGENT_KEY)),
        public_key=raw(AGENT_KEY),
        sign=AGENT_KEY.sign,
        verify=verify,
        pinned_keys={COORD_KEY_ID: raw(COORD_KEY)},
        agent_version="0.1.0",
        nonce=base64.b64encode(b"\x01" * 32).decode(),
        last_coordinator_seq=0,
        now=0.0,
        profile_digest=digest,
    )
    c = coordinator()
    c.receive(one(named.messages_to_send()), now=1.0)
    assert c.hello is not None
    assert c.hello.profile_digest == digest


@pytest.mark.parametrize("digest", ["0" * 63, "A" * 64, "sha256:" + "0" * 64, "0" * 64 + "\n"])
def test_hello_with_a_malformed_profile_digest_is_bad_message(digest: str) -> None:
    [hello] = agent().messages_to_send()
    frame = msgspec.json.decode(encode_frame(hello))
    frame["body"]["profile_digest"] = digest
    with pytest.raises(DecodeError) as refused:
        decode_frame(msgspec.json.encode(frame))
    assert refused.value.code == "bad_message"
