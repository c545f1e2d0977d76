"""Any interleaving of sends, acks, drops, duplicates and reconnects delivers each message once."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.protocol.errors import SequenceError
from agent.protocol.messages import JobStatusBody, ReliableMessage, wrap
from agent.protocol.session import ReliableReceiver, ReliableSender


class Link(RuleBasedStateMachine):
    """A sender and a receiver joined by a channel that may drop and repeat frames.

    The channel is more hostile than a websocket (which never drops or repeats a frame
    within a connection): a receiver that detects the damage answers ``error`` and closes,
    as the protocol says, and the property still has to hold.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sender = ReliableSender()
        self.receiver = ReliableReceiver()
        self.sent: list[str] = []
        self.delivered: list[str] = []
        self.frames: list[ReliableMessage] = []  # sender -> receiver, in flight
        self.acks: list[int] = []  # receiver -> sender, in flight
        self.connected = False
        self.reconnect(stale=False)

    def disconnect(self) -> None:
        self.connected = False
        self.frames, self.acks = [], []

    @rule(stale=st.booleans())
    def reconnect(self, stale: bool) -> None:
        self.disconnect()
        stored = self.receiver.resume()
        # A stale resume point (what the sender last saw acknowledged, which may be behind
        # what was stored) makes the first frames of the session duplicates.
        self.frames = self.sender.resend_from(self.sender.acked_seq if stale else stored)
        self.connected = True

    @rule()
    def send(self) -> None:
        name = f"m{len(self.sent) + 1}"
        self.sent.append(name)
        message = self.sender.send(JobStatusBody(job_id=name, state="running"))
        if self.connected:
            self.frames.append(message)

    @precondition(lambda self: self.frames)
    @rule()
    def deliver(self) -> None:
        message = self.frames.pop(0)
        try:
            new = self.receiver.receive(message)
        except SequenceError:
            self.disconnect()
            return
        if new:
            self.delivered.append(message.body.job_id)  # type: ignore[union-attr]

    @precondition(lambda self: self.frames)
    @rule(data=st.data())
    def drop_frame(self, data: st.DataObject) -> None:
        self.frames.pop(data.draw(st.integers(0, len(self.frames) - 1)))

    @precondition(lambda self: self.frames)
    @rule(data=st.data())
    def duplicate_frame(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.frames) - 1))
        self.frames.insert(data.draw(st.integers(i, len(self.frames))), self.frames[i])

    @precondition(lambda self: self.connected)
    @rule()
    def emit_ack(self) -> None:
        ack = self.receiver.take_ack()
        if ack is not None:
            self.acks.append(ack.body.seq)

    @precondition(lambda self: self.acks)
    @rule()
    def deliver_ack(self) -> None:
        self.sender.on_ack(self.acks.pop(0))

    @precondition(lambda self: self.acks)
    @rule(data=st.data())
    def drop_ack(self, data: st.DataObject) -> None:
        self.acks.pop(data.draw(st.integers(0, len(self.acks) - 1)))

    @invariant()
    def delivered_is_a_prefix_of_sent_without_repeats(self) -> None:
        assert self.delivered == self.sent[: len(self.delivered)]
        assert self.receiver.last_seq == len(self.delivered)

    @invariant()
    def sender_keeps_everything_not_acknowledged(self) -> None:
        assert self.sender.acked_seq <= self.receiver.last_seq
        pending = [m.seq for m in self.sender.pending()]
        assert pending == list(range(self.sender.acked_seq + 1, len(self.sent) + 1))

    def teardown(self) -> None:
        # A last, clean connection drains everything still owed.
        self.reconnect(stale=False)
        while self.frames:
            self.deliver()
        assert self.delivered == self.sent


TestLink = Link.TestCase
TestLink.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_ack_past_what_was_sent_is_ack_ahead() -> None:
    sender = ReliableSender()
    sender.send(JobStatusBody(job_id="j", state="running"))
    with pytest.raises(SequenceError) as err:
        sender.on_ack(2)
    assert err.value.code == "ack_ahead"
    with pytest.raises(SequenceError) as err:
        sender.resend_from(2)
    assert err.value.code == "ack_ahead"


def test_peer_that_lost_what_it_acknowledged_is_ack_behind() -> None:
    sender = ReliableSender()
    for _ in range(3):
        sender.send(JobStatusBody(job_id="j", state="running"))
    sender.on_ack(2)
    with pytest.raises(SequenceError) as err:
        sender.resend_from(1)
    assert err.value.code == "ack_behind"


def test_resend_from_returns_everything_after_the_stored_seq() -> None:
    sender = ReliableSender(next_seq=10)
    for _ in range(4):
        sender.send(JobStatusBody(job_id="j", state="running"))
    assert [m.seq for m in sender.resend_from(11)] == [12, 13]
    assert [m.seq for m in sender.pending()] == [12, 13]


def frame(seq: int) -> ReliableMessage:
    return wrap(JobStatusBody(job_id="j", state="running"), seq)


def test_receiver_refuses_a_gap() -> None:
    receiver = ReliableReceiver(last_seq=4)
    receiver.resume()
    with pytest.raises(SequenceError) as err:
        receiver.receive(frame(6))
    assert err.value.code == "seq_gap"


def test_receiver_refuses_a_seq_going_backwards_within_a_session() -> None:
    receiver = ReliableReceiver()
    receiver.resume()
    assert receiver.receive(frame(1))
    assert receiver.receive(frame(2))
    with pytest.raises(SequenceError) as err:
        receiver.receive(frame(2))
    assert err.value.code == "seq_backwards"


def test_receiver_drops_and_acks_again_what_a_new_session_repeats() -> None:
    receiver = ReliableReceiver(last_seq=3)
    receiver.resume()
    assert not receiver.receive(frame(2))
    assert not receiver.receive(frame(3))
    assert receiver.receive(frame(4))
    ack = receiver.take_ack()
    assert ack is not None
    assert ack.body.seq == 4
    assert receiver.take_ack() is None
