"""Sans-I/O reliable streams: seq numbering, cumulative acks, resend after a reconnect.

docs/protocol.md, "Reliable streams". The sender keeps what it sent until acknowledged;
the receiver stores in order, drops what it already has, and refuses gaps and seqs that go
backwards within a session. Re-exported by :mod:`agent.protocol.session`.
"""

from __future__ import annotations

from collections import deque

from agent.protocol.errors import SequenceError
from agent.protocol.limits import PROTOCOL_VERSION
from agent.protocol.messages import Ack, AckBody, ReliableBody, ReliableMessage, wrap

__all__ = ["ReliableReceiver", "ReliableSender"]


class ReliableSender:
    """Numbers what one side must deliver and keeps it until the peer acknowledges it."""

    def __init__(self, next_seq: int = 1) -> None:
        self._next = next_seq
        self._acked = next_seq - 1
        self._pending: deque[ReliableMessage] = deque()

    @property
    def next_seq(self) -> int:
        """The seq the next :meth:`send` gets."""
        return self._next

    @property
    def acked_seq(self) -> int:
        """The highest seq the peer has acknowledged."""
        return self._acked

    def send(self, body: ReliableBody) -> ReliableMessage:
        """Number a body and keep it; returns the frame to send if connected."""
        message = wrap(body, self._next)
        self._pending.append(message)
        self._next += 1
        return message

    def on_ack(self, seq: int) -> None:
        """Forget everything up to ``seq``; SequenceError ``ack_ahead`` past what was sent."""
        if seq >= self._next:
            raise SequenceError("ack_ahead", f"ack {seq}, last sent {self._next - 1}")
        # An older cumulative ack than one already seen says nothing new.
        while self._pending and self._pending[0].seq <= seq:
            self._pending.popleft()
        self._acked = max(self._acked, seq)

    def resend_from(self, last_stored_seq: int) -> list[ReliableMessage]:
        """After a reconnect: what to send again, given the last seq the peer stored.

        Raises:
            SequenceError: ``ack_ahead`` if the peer stored more than was sent,
                ``ack_behind`` if it lost what it had acknowledged.
        """
        if last_stored_seq < self._acked:
            raise SequenceError(
                "ack_behind", f"peer stored {last_stored_seq}, acknowledged {self._acked}"
            )
        self.on_ack(last_stored_seq)
        return list(self._pending)

    def pending(self) -> list[ReliableMessage]:
        """Sent and not yet acknowledged, in seq order."""
        return list(self._pending)


class ReliableReceiver:
    """Accepts a reliable stream in order, drops duplicates, and says what to acknowledge.

    Within one session (from :meth:`resume`) seqs must strictly increase: a sender resends
    only after a reconnect, so a seq at or below the previous one is ``seq_backwards``. The
    first seqs of a session may repeat what was stored (the sender's view was stale):
    those are duplicates, dropped and acknowledged again.
    """

    def __init__(self, last_seq: int = 0) -> None:
        self._last = last_seq
        self._session_high: int | None = None
        self._ack_due = False

    @property
    def last_seq(self) -> int:
        """The highest seq stored: every seq up to it was received once."""
        return self._last

    def resume(self) -> int:
        """Start a session; returns the last stored seq to tell the sender."""
        self._session_high = None
        self._ack_due = False
        return self._last

    def receive(self, message: ReliableMessage) -> bool:
        """Whether ``message`` is new (store and deliver it) or a duplicate (drop it).

        Raises:
            SequenceError: ``seq_gap`` if messages are missing before it, ``seq_backwards``
                if its seq is not above the previous one of this session.
        """
        seq = message.seq
        if self._session_high is not None and seq <= self._session_high:
            raise SequenceError("seq_backwards", f"seq {seq} after {self._session_high}")
        self._session_high = seq
        if seq > self._last + 1:
            raise SequenceError("seq_gap", f"seq {seq}, expected {self._last + 1}")
        self._ack_due = True
        if seq <= self._last:
            return False
        self._last = seq
        return True

    def take_ack(self) -> Ack | None:
        """The cumulative ``ack`` to send, or None when nothing arrived since the last one."""
        if not self._ack_due:
            return None
        self._ack_due = False
        return Ack(v=PROTOCOL_VERSION, body=AckBody(seq=self._last))
