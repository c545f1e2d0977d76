"""Both sides' connection machines driven against each other in memory: no sockets."""

from __future__ import annotations

import itertools
import json

import msgspec
import pytest

from agent.protocol import crypto
from agent.protocol.bodies import (
    AckBody,
    AttestRequestBody,
    JobCancelBody,
    TelemetryBody,
    WelcomeBody,
)
from agent.protocol.connection import (
    Acked,
    AgentConnection,
    Authenticated,
    Close,
    ConnectionState,
    CoordinatorConnection,
    Deliver,
    Event,
    PeerError,
    Welcomed,
)
from agent.protocol.errors import AuthError, LimitExceeded
from agent.protocol.limits import MAX_FRAME_BYTES, MAX_SEQ
from agent.protocol.messages import (
    AttestRequest,
    Telemetry,
    decode_frame,
    encode_frame,
    encode_reliable,
    reliable_overhead,
    wrap,
)
from agent.protocol.reliable import ReliableSender
from agent.protocol.session import NonceBook

AGENT_KEY = crypto.generate_private_key()
COORD_KEY = crypto.generate_private_key()
COORD_PUBLIC = crypto.public_key_bytes(COORD_KEY)
COORD_KEY_ID = crypto.key_id(COORD_PUBLIC)
_counter = itertools.count(1)


def nonce() -> str:
    return crypto.b64encode(next(_counter).to_bytes(32, "big"))


def agent(
    *, last_seq: int = 0, last_acked: int = 0, last_coordinator_seq: int = 0
) -> AgentConnection:
    public = crypto.public_key_bytes(AGENT_KEY)
    return AgentConnection(
        node_id=crypto.node_id(public),
        public_key=public,
        sign=lambda data: crypto.sign(AGENT_KEY, data),
        verify=crypto.verify,
        pinned_keys={COORD_KEY_ID: COORD_PUBLIC},
        agent_version="0.1.0",
        nonce=nonce(),
        last_coordinator_seq=last_coordinator_seq,
        last_seq=last_seq,
        last_acked=last_acked,
        now=0.0,
    )


def coordinator(nonces: NonceBook | None = None) -> CoordinatorConnection:
    return CoordinatorConnection(
        key_id=COORD_KEY_ID,
        sign=lambda data: crypto.sign(COORD_KEY, data),
        verify=crypto.verify,
        node_id_of=crypto.node_id,
        nonces=nonces or NonceBook(),
        new_nonce=nonce,
    )


def pump(a: AgentConnection, c: CoordinatorConnection) -> tuple[list[Event], list[Event]]:
    """Carry frames both ways until neither side has any, each side handling what it is
    delivered at once; the events each side saw."""
    seen: tuple[list[Event], list[Event]] = ([], [])
    while True:
        to_c, to_a = a.frames_to_send(), c.frames_to_send()
        if not to_c and not to_a:
            return seen
        for side, frames, log in ((c, to_c, seen[1]), (a, to_a, seen[0])):
            for frame in frames:
                events = side.receive_frame(frame, 1.0)
                log.extend(events)
                for event in events:
                    if isinstance(event, Deliver):
                        side.handled(event.message.seq)


def open_pair(
    *,
    stored: int = 0,
    sender: ReliableSender | None = None,
    last_seq: int = 0,
    last_acked: int = 0,
    last_coordinator_seq: int = 0,
) -> tuple[AgentConnection, CoordinatorConnection, list[Event]]:
    a = agent(last_seq=last_seq, last_acked=last_acked, last_coordinator_seq=last_coordinator_seq)
    c = coordinator()
    _, seen_c = pump(a, c)
    assert [type(e) for e in seen_c] == [Authenticated]
    assert c.authenticated
    c.resume(sender or ReliableSender(), stored)
    c.accept(session_id="s-1", heartbeat_s=30.0, telemetry_interval_s=1.0)
    seen_a, _ = pump(a, c)
    return a, c, seen_a


def telemetry(seq: int) -> tuple[str, int, bytes]:
    return "telemetry", seq, msgspec.json.encode(TelemetryBody(samples=[{"n": seq}]))


def test_handshake_opens_both_sides_and_tells_the_agent_what_is_stored() -> None:
    a, c, seen = open_pair(stored=3, last_seq=5, last_acked=2)
    (welcomed,) = seen
    assert isinstance(welcomed, Welcomed)
    assert welcomed.welcome.last_agent_seq == 3
    assert a.state is c.state is ConnectionState.OPEN


def test_agent_stream_is_delivered_once_and_acked_after_it_is_handled() -> None:
    a, c, _ = open_pair(last_seq=2)
    for entry in (telemetry(1), telemetry(2)):
        a.send_reliable(*entry)
    frames = a.frames_to_send()
    events = c.receive_frame(frames[0], 2.0)
    assert [type(e) for e in events] == [Deliver]
    assert c.frames_to_send() == []  # no ack before the application committed it
    with pytest.raises(RuntimeError):
        c.receive_frame(frames[1], 2.0)  # the driver handles before it reads on
    c.handled(1)
    ack = c.frames_to_send()
    assert [json.loads(f)["body"] for f in ack] == [{"seq": 1}]
    assert a.receive_frame(ack[0], 2.0) == [Acked(1)]
    assert a.progressed


def test_duplicate_is_dropped_and_acknowledged_again() -> None:
    # The coordinator stored 1; the agent's view was stale and it resends 1.
    a, c, _ = open_pair(stored=1, last_seq=2)
    c2 = c  # same session: the resend comes first
    a.send_reliable(*telemetry(1))
    a.send_reliable(*telemetry(2))
    first, second = a.frames_to_send()
    assert c2.receive_frame(first, 2.0) == []
    assert [json.loads(f)["body"] for f in c2.frames_to_send()] == [{"seq": 1}]
    assert [type(e) for e in c2.receive_frame(second, 2.0)] == [Deliver]


def test_gap_closes_with_seq_gap_naming_the_seq() -> None:
    _a, c, _ = open_pair(last_seq=3)
    events = c.receive_frame(encode_reliable(*telemetry(2)), 2.0)
    assert [type(e) for e in events] == [Close]
    assert isinstance(events[0], Close)
    assert events[0].error.code == "seq_gap"
    (error,) = [json.loads(f) for f in c.frames_to_send()]
    assert error["body"]["code"] == "seq_gap"
    assert error["body"]["ref_seq"] == 2
    assert c.state is ConnectionState.CLOSED
    assert c.receive_frame(encode_reliable(*telemetry(1)), 2.0) == []


def test_seq_going_back_closes_with_seq_backwards() -> None:
    _a, c, _ = open_pair(stored=2, last_seq=3)
    assert c.receive_frame(encode_reliable(*telemetry(2)), 2.0) == []  # a resend
    events = c.receive_frame(encode_reliable(*telemetry(1)), 2.0)
    assert isinstance(events[0], Close)
    assert events[0].error.code == "seq_backwards"


def test_ack_ahead_of_what_the_agent_sent_closes() -> None:
    a, _c, _ = open_pair(last_seq=2)
    a.send_reliable(*telemetry(1))
    a.send_reliable(*telemetry(2))
    ack = encode_frame(wrap(AckBody(seq=3)))
    events = a.receive_frame(ack, 2.0)
    assert isinstance(events[0], Close)
    assert events[0].error.code == "ack_ahead"
    assert json.loads(a.frames_to_send()[-1])["body"]["code"] == "ack_ahead"


def test_ack_ahead_of_what_the_coordinator_numbered_closes() -> None:
    _a, c, _ = open_pair()
    ack = encode_frame(wrap(AckBody(seq=1)))
    events = c.receive_frame(ack, 2.0)
    assert isinstance(events[0], Close)
    assert events[0].error.code == "ack_ahead"


def test_welcome_that_stored_more_than_was_sent_is_ack_ahead() -> None:
    a = agent(last_seq=2)
    c = coordinator()
    pump(a, c)
    c.resume(ReliableSender(), 5)
    c.accept(session_id="s-1", heartbeat_s=30.0, telemetry_interval_s=1.0)
    seen_a, _ = pump(a, c)
    assert isinstance(seen_a[0], Close)
    assert seen_a[0].error.code == "ack_ahead"
    assert a.state is ConnectionState.CLOSED


def test_welcome_that_lost_what_it_acknowledged_is_ack_behind() -> None:
    a = agent(last_seq=4, last_acked=3)
    c = coordinator()
    pump(a, c)
    c.resume(ReliableSender(), 1)
    c.accept(session_id="s-1", heartbeat_s=30.0, telemetry_interval_s=1.0)
    seen_a, _ = pump(a, c)
    assert isinstance(seen_a[0], Close)
    assert seen_a[0].error.code == "ack_behind"


def test_coordinator_stream_resumes_after_what_the_agent_stored() -> None:
    # The coordinator numbered 1..3; the agent handled 1 before the connection dropped.
    sender = ReliableSender()
    for _ in range(3):
        sender.send(AttestRequestBody(nonce=nonce()))
    sender.resend_from(1)
    _, c, seen = open_pair(sender=sender, last_coordinator_seq=1)
    assert [e.message.seq for e in seen if isinstance(e, Deliver)] == [2, 3]
    assert c.pending() == []  # both acknowledged


def test_coordinator_queues_before_welcome_and_sends_after() -> None:
    a = agent()
    c = coordinator()
    pump(a, c)
    c.resume(ReliableSender(), 0)
    assert c.next_seq == 1
    message = c.send_reliable(JobCancelBody(job_id="j"))
    assert message.seq == 1
    assert c.frames_to_send() == []
    c.accept(session_id="s-1", heartbeat_s=30.0, telemetry_interval_s=1.0)
    kinds = [json.loads(f)["type"] for f in c.frames_to_send()]
    assert kinds == ["welcome", "job_cancel"]
    assert isinstance(c.pending()[0], type(message))


def test_encode_reliable_writes_what_the_typed_encoder_writes() -> None:
    body = TelemetryBody(samples=[{"gpu": 0}])
    assert encode_reliable("telemetry", 7, msgspec.json.encode(body)) == encode_frame(wrap(body, 7))


def test_reliable_overhead_is_exact_for_the_longest_seq() -> None:
    body = b'{"samples":[],"dropped":0}'
    assert len(encode_reliable("telemetry", MAX_SEQ, body)) == reliable_overhead("telemetry") + len(
        body
    )
    assert reliable_overhead("job_log", 5) == len(encode_reliable("job_log", 5, b""))


def test_frame_one_byte_over_the_limit_is_refused_when_encoding() -> None:
    room = MAX_FRAME_BYTES - reliable_overhead("telemetry", 1)
    fits = b'"' + b"x" * (room - 2) + b'"'
    assert len(encode_reliable("telemetry", 1, fits)) == MAX_FRAME_BYTES
    with pytest.raises(LimitExceeded) as raised:
        encode_reliable("telemetry", 1, fits[:-1] + b'x"')
    assert raised.value.code == "frame_too_large"
    a, _, _ = open_pair(last_seq=1)
    with pytest.raises(LimitExceeded):
        a.send_reliable("telemetry", 1, fits[:-1] + b'x"')


def test_frame_too_large_received_is_answered_and_the_session_goes_on() -> None:
    _a, c, _ = open_pair()
    assert c.receive_frame("x" * (MAX_FRAME_BYTES + 1), 2.0) == []
    assert json.loads(c.frames_to_send()[0])["body"]["code"] == "frame_too_large"
    assert c.state is ConnectionState.OPEN


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b'{"v":1,"type":"ack","body":{"seq":0}}', "binary_frame"),
        ("[" * 100_000 + "]" * 100_000, "bad_json"),
        ('{"v":2,"type":"ack","body":{"seq":0}}', "bad_version"),
        (encode_frame(wrap(AttestRequestBody(nonce=nonce()), 1)), "unknown_type"),
        ('{"v":1,"type":"hello","body":{}}', "bad_message"),
        ('{"v":1,"type":"ack","body":{"seq":-1}}', "bad_message"),
        ("not json", "bad_json"),
    ],
)
def test_hostile_frame_after_welcome_is_answered_and_changes_nothing(
    frame: str | bytes, code: str
) -> None:
    a, c, _ = open_pair()
    assert c.receive_frame(frame, 2.0) == []
    (answer,) = [json.loads(f) for f in c.frames_to_send()]
    assert answer["type"] == "error"
    assert answer["body"]["code"] == code
    assert c.state is ConnectionState.OPEN
    a.send_reliable(*telemetry(1))
    assert [type(e) for e in c.receive_frame(a.frames_to_send()[0], 2.0)] == [Deliver]


def test_handshake_message_after_welcome_is_unknown_type_on_both_sides() -> None:
    a, c, _ = open_pair()
    hello = agent().frames_to_send()[0]
    assert c.receive_frame(hello, 2.0) == []
    assert json.loads(c.frames_to_send()[0])["body"]["code"] == "unknown_type"
    welcome = encode_frame(
        wrap(WelcomeBody(session_id="s", last_agent_seq=0, heartbeat_s=1, telemetry_interval_s=1))
    )
    assert a.receive_frame(welcome, 2.0) == []
    assert json.loads(a.frames_to_send()[0])["body"]["code"] == "unknown_type"


def test_hostile_frame_during_the_handshake_closes() -> None:
    c = coordinator()
    events = c.receive_frame(b"\x00", 0.0)
    assert isinstance(events[0], Close)
    assert events[0].error.code == "binary_frame"
    assert json.loads(c.frames_to_send()[0])["body"]["code"] == "binary_frame"
    c = coordinator()
    events = c.receive_frame('{"v":1,"type":"ack","body":{"seq":0}}', 0.0)
    assert isinstance(events[0], Close)
    assert events[0].error.code == "handshake_required"


def test_peer_error_is_an_event_never_answered() -> None:
    a, _c, _ = open_pair()
    error = '{"v":1,"type":"error","body":{"code":"rate_limited","detail":"slow","ref_seq":null}}'
    assert a.receive_frame(error, 2.0) == [PeerError("rate_limited", "slow", None)]
    assert a.frames_to_send() == []


def test_coordinator_refusal_is_sent_and_closes() -> None:
    a = agent()
    c = coordinator()
    pump(a, c)
    c.refuse(AuthError("not_admitted", "no"))
    seen_a, _ = pump(a, c)
    assert isinstance(seen_a[0], Close)
    assert seen_a[0].error.code == "handshake_refused"
    assert a.frames_to_send() == []  # an error is not answered


def test_check_hello_refuses_before_any_challenge_is_signed() -> None:
    signed: list[bytes] = []

    def refuse(hello: object) -> None:
        raise LimitExceeded("rate_limited", "too many new keys")

    def sign(data: bytes) -> bytes:
        signed.append(data)
        return crypto.sign(COORD_KEY, data)

    c = CoordinatorConnection(
        key_id=COORD_KEY_ID,
        sign=sign,
        verify=crypto.verify,
        node_id_of=crypto.node_id,
        nonces=NonceBook(),
        new_nonce=nonce,
        check_hello=refuse,
    )
    events = c.receive_frame(agent().frames_to_send()[0], 0.0)
    assert isinstance(events[0], Close)
    assert events[0].error.code == "rate_limited"
    assert signed == []


def test_application_error_carries_the_seq_and_closes_when_its_class_says() -> None:
    a, c, _ = open_pair(last_seq=1)
    a.send_reliable(*telemetry(1))
    (event,) = c.receive_frame(a.frames_to_send()[0], 2.0)
    assert isinstance(event, Deliver)
    assert isinstance(event.message, Telemetry)
    c.handled(1)
    assert c.fail(LimitExceeded("quota_exceeded", "shed"), 1) is False
    ack, error = [json.loads(f) for f in c.frames_to_send()]
    assert ack["body"] == {"seq": 1}
    assert error["body"]["ref_seq"] == 1
    assert c.fail(AuthError("bad_signature", "receipt")) is True
    assert c.state is ConnectionState.CLOSED


def test_agent_takes_only_what_a_coordinator_sends() -> None:
    a, _, _ = open_pair()
    telemetry_frame = encode_reliable(*telemetry(1))
    assert a.receive_frame(telemetry_frame, 2.0) == []
    assert json.loads(a.frames_to_send()[0])["body"]["code"] == "unknown_type"
    offer = encode_frame(wrap(AttestRequestBody(nonce=nonce()), 1))
    (event,) = a.receive_frame(offer, 2.0)
    assert isinstance(event, Deliver)
    assert isinstance(event.message, AttestRequest)
    assert decode_frame(offer) == event.message


def test_reconnect_resends_after_what_the_coordinator_stored_and_nothing_twice() -> None:
    # First connection: the agent sends 1..3; the coordinator stores 1 and 2, then the
    # connection drops before 3 arrives and before the agent saw any ack.
    a, c, _ = open_pair(last_seq=3)
    for seq in (1, 2, 3):
        a.send_reliable(*telemetry(seq))
    frames = a.frames_to_send()
    stored: list[int] = []
    for frame in frames[:2]:
        (event,) = c.receive_frame(frame, 2.0)
        assert isinstance(event, Deliver)
        stored.append(event.message.seq)
        c.handled(event.message.seq)
    # Second connection: welcome says 2 is stored; the agent resends from there.
    a, c, seen = open_pair(stored=stored[-1], last_seq=3, last_acked=0)
    (welcomed,) = seen
    assert isinstance(welcomed, Welcomed)
    resend_from = welcomed.welcome.last_agent_seq + 1
    assert resend_from == 3
    a.send_reliable(*telemetry(3))
    (event,) = c.receive_frame(a.frames_to_send()[0], 3.0)
    assert isinstance(event, Deliver)
    stored.append(event.message.seq)
    c.handled(3)
    assert a.receive_frame(c.frames_to_send()[0], 3.0) == [Acked(3)]
    assert stored == [1, 2, 3]


def test_agent_refuses_a_gap_in_the_coordinator_stream_naming_the_seq() -> None:
    a, _, _ = open_pair(last_coordinator_seq=4)
    events = a.receive_frame(encode_frame(wrap(AttestRequestBody(nonce=nonce()), 6)), 2.0)
    assert [type(e) for e in events] == [Close]
    (error,) = [json.loads(f) for f in a.frames_to_send()]
    assert error["body"]["code"] == "seq_gap"
    assert error["body"]["ref_seq"] == 6
