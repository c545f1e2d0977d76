"""Two connected tunnel machines under random interleavings of every operation.

Whatever the order of opens, sends, ends, reads, resets and partial deliveries: no side
ever breaks the other's rules (a window exceeded would be ``flow_control``), every byte
arrives intact and in order on its stream, and once both sides keep reading, everything
sent arrives (no deadlock).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol.tunnel import (
    Role,
    StreamEnded,
    StreamOpened,
    StreamReadable,
    StreamReset,
    TunnelEvent,
    TunnelFailed,
    TunnelMux,
)

_SIDES = (Role.COORDINATOR, Role.AGENT)


@dataclass
class _Side:
    mux: TunnelMux
    sent: dict[int, bytearray] = field(default_factory=dict)
    received: dict[int, bytearray] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)  # this side called end()
    peer_ended: set[int] = field(default_factory=set)  # StreamEnded came
    reset: set[int] = field(default_factory=set)  # reset by either side

    def take(self, events: list[TunnelEvent]) -> None:
        for event in events:
            assert not isinstance(event, TunnelFailed), event.error
            if isinstance(event, StreamOpened):
                self.sent.setdefault(event.stream_id, bytearray())
                self.received.setdefault(event.stream_id, bytearray())
            elif isinstance(event, StreamEnded):
                self.peer_ended.add(event.stream_id)
            elif isinstance(event, StreamReset):
                self.reset.add(event.stream_id)
            else:
                assert isinstance(event, StreamReadable)

    def read(self, stream_id: int, max_bytes: int) -> None:
        data = self.mux.read(stream_id, max_bytes)
        self.received.setdefault(stream_id, bytearray()).extend(data)


_op = st.one_of(
    st.tuples(st.just("open"), st.sampled_from(_SIDES)),
    st.tuples(st.just("send"), st.sampled_from(_SIDES), st.integers(0, 7), st.integers(1, 3000)),
    st.tuples(st.just("end"), st.sampled_from(_SIDES), st.integers(0, 7)),
    st.tuples(st.just("reset"), st.sampled_from(_SIDES), st.integers(0, 7)),
    st.tuples(st.just("read"), st.sampled_from(_SIDES), st.integers(0, 7), st.integers(1, 5000)),
    st.tuples(st.just("deliver"), st.sampled_from(_SIDES), st.integers(20, 6000)),
)


def _payload(stream_id: int, offset: int, size: int) -> bytes:
    """Bytes whose value says where they belong: a byte out of place shows."""
    return bytes((stream_id * 31 + offset + i) % 251 for i in range(size))


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(_op, max_size=120),
    window=st.integers(64, 4096),
    connection_factor=st.integers(1, 4),
)
def test_random_interleavings_deliver_every_byte_in_order_within_the_windows(
    ops: list[tuple[object, ...]], window: int, connection_factor: int
) -> None:
    sides = {
        role: _Side(TunnelMux(role, window=window, connection_window=window * connection_factor))
        for role in _SIDES
    }
    opened: list[int] = []

    def other(role: Role) -> Role:
        return Role.AGENT if role is Role.COORDINATOR else Role.COORDINATOR

    def deliver(src: Role, max_bytes: int) -> bool:
        message = sides[src].mux.data_to_send(max_bytes)
        if message:
            sides[other(src)].take(sides[other(src)].mux.receive_data(message))
        return bool(message)

    for op in ops:
        kind, role = op[0], op[1]
        assert isinstance(role, Role)
        side = sides[role]
        if kind == "open":
            if side.mux.open_streams < 8:
                sid = side.mux.open("svc")
                opened.append(sid)
                side.sent[sid] = bytearray()
            continue
        if kind == "deliver":
            assert isinstance(op[2], int)
            deliver(role, op[2])
            continue
        if not opened:
            continue
        assert isinstance(op[2], int)
        sid = opened[op[2] % len(opened)]
        if kind == "send":
            assert isinstance(op[3], int)
            sent = side.sent.setdefault(sid, bytearray())
            data = _payload(sid, len(sent), op[3])
            if side.mux.send(sid, data):
                sent.extend(data)
        elif kind == "end":
            if side.mux.is_open(sid):  # not yet heard of, or over: end() does nothing
                side.ended.add(sid)
            side.mux.end(sid)
        elif kind == "reset":
            if side.mux.is_open(sid):
                side.reset.add(sid)
            side.mux.reset(sid)
        else:
            assert isinstance(op[3], int)
            side.read(sid, op[3])
        # What arrived so far is always what was sent, in order.
        for sid_ in opened:
            for role_ in _SIDES:
                got = sides[other(role_)].received.get(sid_, bytearray())
                assert sides[role_].sent.get(sid_, bytearray()).startswith(got)
        # Windows grow only within a quarter of the connection's, given back as streams go.
        for side_ in sides.values():
            grown = sum(s.window - window for s in side_.mux._streams.values())
            assert side_.mux._grown == grown <= window * connection_factor // 4
        # What is queued to send, all streams together, is what the streams hold.
        for side_ in sides.values():
            assert side_.mux.queued == sum(s.out_bytes for s in side_.mux._streams.values())

    # Both sides keep reading and delivering: everything sent arrives.
    for _ in range(10_000):
        moved = deliver(Role.COORDINATOR, 6000) | deliver(Role.AGENT, 6000)
        for side in sides.values():
            for sid in opened:
                before = len(side.received.get(sid, b""))
                side.read(sid, 1 << 20)
                moved |= len(side.received.get(sid, b"")) > before
        if not moved:
            break
    else:
        raise AssertionError("no quiescence")
    for sid in opened:
        for role in _SIDES:
            src, dst = sides[role], sides[other(role)]
            if sid in src.reset or sid in dst.reset:
                assert src.sent.get(sid, bytearray()).startswith(dst.received.get(sid, b""))
                continue
            assert dst.received.get(sid, bytearray()) == src.sent.get(sid, bytearray())
            if sid in src.ended:
                assert sid in dst.peer_ended
    for side in sides.values():
        assert not side.mux.closed
