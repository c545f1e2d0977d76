"""The tunnel's sans-I/O machine and frame codec: streams, flow control, hostile frames."""

from __future__ import annotations

import struct
import tracemalloc

import pytest

from agent.protocol.errors import LimitExceeded, TunnelError
from agent.protocol.tunnel import (
    CHUNK_BYTES,
    CONNECTION_WINDOW,
    MAX_BATCH_BYTES,
    MAX_CONTROL_BACKLOG,
    STREAM_WINDOW,
    Role,
    StreamEnded,
    StreamOpened,
    StreamReadable,
    StreamReset,
    TunnelEvent,
    TunnelFailed,
    TunnelMux,
)
from agent.protocol.tunnel_frames import (
    MAX_DATA_BYTES,
    Data,
    End,
    Open,
    Reset,
    Window,
    decode_frames,
    encode_data,
    encode_end,
    encode_open,
    encode_reset,
    encode_window,
)

_HEADER = struct.Struct(">BII")


def _pair(
    window: int = STREAM_WINDOW, connection_window: int = CONNECTION_WINDOW
) -> tuple[TunnelMux, ...]:
    return tuple(
        TunnelMux(role, window=window, connection_window=connection_window)
        for role in (Role.COORDINATOR, Role.AGENT)
    )


def _deliver(src: TunnelMux, dst: TunnelMux) -> list[TunnelEvent]:
    events: list[TunnelEvent] = []
    while message := src.data_to_send():
        events += dst.receive_data(message)
    return events


def _failure(mux: TunnelMux, message: bytes) -> str:
    events = mux.receive_data(message)
    assert isinstance(events[-1], TunnelFailed), events
    assert mux.closed
    return events[-1].error.code


# -- the codec ------------------------------------------------------------------------------


def test_every_frame_type_round_trips() -> None:
    message = (
        encode_open(1, "llama:8080")
        + encode_data(1, b"x" * MAX_DATA_BYTES)
        + encode_window(0, 2**31 - 1)
        + encode_end(1)
        + encode_reset(3, "too_many_streams")
    )
    assert decode_frames(message) == [
        Open(1, "llama:8080"),
        Data(1, b"x" * MAX_DATA_BYTES),
        Window(0, 2**31 - 1),
        End(1),
        Reset(3, "too_many_streams"),
    ]


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"", "bad_frame"),
        (encode_end(1)[:5], "bad_frame"),  # a truncated header
        (_HEADER.pack(2, 1, 10) + b"abc", "bad_frame"),  # a truncated payload
        (_HEADER.pack(2, 1, 0), "bad_frame"),  # empty DATA
        (_HEADER.pack(2, 1, MAX_DATA_BYTES + 1) + b"x" * (MAX_DATA_BYTES + 1), "frame_too_large"),
        (_HEADER.pack(2, 1, 2**32 - 1), "frame_too_large"),
        (_HEADER.pack(9, 1, 0), "unknown_frame"),
        (_HEADER.pack(0, 1, 0), "unknown_frame"),
        (_HEADER.pack(4, 2**31, 0), "bad_stream_id"),
        (_HEADER.pack(4, 1, 1) + b"x", "bad_frame"),  # END with a payload
        (_HEADER.pack(3, 1, 4) + b"\0\0\0\0", "bad_frame"),  # a zero increment
        (_HEADER.pack(3, 1, 4) + b"\x80\0\0\0", "bad_frame"),  # over 2^31-1
        (_HEADER.pack(3, 1, 2) + b"\0\1", "bad_frame"),
        (_HEADER.pack(1, 1, 0), "bad_target"),
        (_HEADER.pack(1, 1, 3) + b"a b", "bad_target"),
        (_HEADER.pack(1, 1, 4) + b"-abc", "bad_target"),
        (_HEADER.pack(1, 1, 4) + b"ab\n\0", "bad_target"),
        (_HEADER.pack(1, 1, 3) + "é".encode() + b"a", "bad_target"),
        (_HEADER.pack(1, 1, 129) + b"a" * 129, "bad_target"),
        (_HEADER.pack(5, 1, 0), "bad_frame"),  # a reset without a code
        (_HEADER.pack(5, 1, 4) + b"NOPE", "bad_frame"),
    ],
)
def test_a_malformed_message_is_refused_with_a_code(message: bytes, code: str) -> None:
    with pytest.raises(TunnelError) as refused:
        decode_frames(message)
    assert refused.value.code == code
    assert refused.value.closes
    # The machine fails the connection with the same code, whatever was open.
    agent = TunnelMux(Role.AGENT)
    assert _failure(agent, message) == code


def test_a_target_or_code_the_peer_would_refuse_is_not_encoded() -> None:
    with pytest.raises(ValueError, match="bad target name"):
        encode_open(1, "a" * 129)
    with pytest.raises(ValueError, match="bad reset code"):
        encode_reset(1, "Bad Code")


# -- streams ------------------------------------------------------------------------------


def test_a_stream_carries_bytes_both_ways_and_closes_when_both_ended() -> None:
    coordinator, agent = _pair()
    sid = coordinator.open("svc")
    coordinator.send(sid, b"GET / HTTP/1.1\r\n\r\n")
    coordinator.end(sid)
    events = _deliver(coordinator, agent)
    assert events == [StreamOpened(sid, "svc"), StreamReadable(sid), StreamEnded(sid)]
    assert agent.read(sid, 1000) == b"GET / HTTP/1.1\r\n\r\n"
    agent.send(sid, b"HTTP/1.1 200 OK\r\n\r\nhi")
    agent.end(sid)
    assert agent.is_open(sid)  # its END goes out after the bytes queued
    assert _deliver(agent, coordinator) == [StreamReadable(sid), StreamEnded(sid)]
    assert not agent.is_open(sid)  # ended both ways, read out
    assert coordinator.read(sid, 1000) == b"HTTP/1.1 200 OK\r\n\r\nhi"
    assert not coordinator.is_open(sid)
    assert coordinator.open_streams == agent.open_streams == 0
    # No event says a stream finished: the drivers take the list, once.
    assert coordinator.take_finished() == agent.take_finished() == [sid]
    assert coordinator.take_finished() == []


def test_a_reset_cancels_the_stream_on_the_other_side_with_its_code() -> None:
    coordinator, agent = _pair()
    sid = coordinator.open("svc")
    _deliver(coordinator, agent)
    agent.reset(sid, "unknown_target")
    assert _deliver(agent, coordinator) == [StreamReset(sid, "unknown_target", remote=True)]
    assert not coordinator.send(sid, b"more")


def test_opens_past_the_cap_are_reset_too_many_streams_not_a_failure() -> None:
    coordinator, agent = (
        TunnelMux(Role.COORDINATOR, max_streams=10_000),
        TunnelMux(Role.AGENT, max_streams=3),
    )
    ids = [coordinator.open("svc") for _ in range(5)]
    events = _deliver(coordinator, agent)
    assert [e for e in events if isinstance(e, StreamOpened)] == [
        StreamOpened(i, "svc") for i in ids[:3]
    ]
    assert agent.open_streams == 3
    back = _deliver(agent, coordinator)
    assert back == [StreamReset(i, "too_many_streams", remote=True) for i in ids[3:]]
    # Data already in flight on a refused stream is dropped, not a protocol error.
    assert agent.receive_data(encode_data(ids[4], b"late")) == []
    assert not agent.closed


def test_opens_past_the_cap_cost_bounded_memory_however_many() -> None:
    agent = TunnelMux(Role.AGENT, max_streams=256)
    stream_id = 1

    def batch() -> None:
        nonlocal stream_id
        message = b"".join(encode_open(stream_id + 2 * i, "svc") for i in range(100))
        stream_id += 200
        agent.receive_data(message)
        agent.data_to_send()  # the resets go out

    for _ in range(100):  # the cap reached, and the memory of resets filled
        batch()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(1000):  # 100,000 more opens
            batch()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert agent.open_streams == 256
    assert not agent.closed
    assert grown < 256 * 1024, grown


def test_a_side_that_accepts_no_opens_refuses_each_and_counts_them_as_owed() -> None:
    coordinator = TunnelMux(Role.COORDINATOR, accept_opens=False)
    assert coordinator.receive_data(encode_open(2, "svc")) == []
    assert decode_frames(coordinator.data_to_send()) == [Reset(2, "refused")]
    message = b"".join(encode_open(2 * i + 4, "svc") for i in range(MAX_CONTROL_BACKLOG + 1))
    assert _failure(coordinator, message) == "flood"


def test_this_side_cannot_open_past_its_own_cap() -> None:
    coordinator = TunnelMux(Role.COORDINATOR, max_streams=2)
    coordinator.open("a")
    coordinator.open("b")
    with pytest.raises(LimitExceeded) as refused:
        coordinator.open("c")
    assert refused.value.code == "too_many_streams"


def test_ten_thousand_opens_in_one_message_are_a_flood() -> None:
    agent = TunnelMux(Role.AGENT, max_streams=256)
    message = b"".join(encode_open(2 * i + 1, "svc") for i in range(10_000))
    events = agent.receive_data(message)
    assert isinstance(events[-1], TunnelFailed)
    assert events[-1].error.code == "flood"
    assert MAX_CONTROL_BACKLOG < 10_000 - 256
    # Every stream it had opened is reset for the driver, and nothing is left.
    assert not any(isinstance(e, StreamOpened) for e in events)
    assert agent.open_streams == 0


# -- hostile streams ----------------------------------------------------------------------


def test_frames_on_a_stream_never_opened_fail_with_unknown_stream() -> None:
    agent = TunnelMux(Role.AGENT)
    assert _failure(agent, encode_data(7, b"x")) == "unknown_stream"
    coordinator = TunnelMux(Role.COORDINATOR)
    assert _failure(coordinator, encode_window(1, 5)) == "unknown_stream"  # its own parity


@pytest.mark.parametrize(
    "message",
    [
        encode_open(2, "svc"),  # the agent's parity, sent to the agent
        encode_open(3, "svc") + encode_open(3, "svc"),  # an id used again
        encode_open(5, "svc") + encode_open(3, "svc"),  # ids going back
        encode_data(0, b"x"),
        encode_reset(0, "cancel"),
    ],
)
def test_stream_ids_of_the_wrong_side_or_order_fail_with_bad_stream_id(message: bytes) -> None:
    assert _failure(TunnelMux(Role.AGENT), message) == "bad_stream_id"


def test_data_beyond_the_stream_window_fails_with_flow_control() -> None:
    agent = TunnelMux(Role.AGENT, window=1000)
    agent.receive_data(encode_open(1, "svc") + encode_data(1, b"x" * 1000))
    assert _failure(agent, encode_data(1, b"x")) == "flow_control"


def test_data_beyond_the_connection_window_fails_with_flow_control() -> None:
    agent = TunnelMux(Role.AGENT, window=1000, connection_window=1500)
    agent.receive_data(encode_open(1, "a") + encode_open(3, "b") + encode_data(1, b"x" * 1000))
    assert _failure(agent, encode_data(3, b"x" * 501)) == "flow_control"


@pytest.mark.parametrize("stream_id", [0, 1])
def test_a_window_past_2_31_minus_1_fails_with_window_overflow(stream_id: int) -> None:
    agent = TunnelMux(Role.AGENT)
    agent.receive_data(encode_open(1, "svc"))
    assert _failure(agent, encode_window(stream_id, 2**31 - 1)) == "window_overflow"


def test_data_after_the_peer_ended_fails_with_stream_closed() -> None:
    agent = TunnelMux(Role.AGENT)
    agent.receive_data(encode_open(1, "svc") + encode_end(1))
    assert _failure(agent, encode_data(1, b"x")) == "stream_closed"


def test_data_on_a_stream_over_both_ways_fails_with_stream_closed() -> None:
    agent = TunnelMux(Role.AGENT)
    agent.receive_data(encode_open(1, "svc") + encode_end(1))
    agent.end(1)
    assert not agent.is_open(1)
    # A WINDOW may cross the END: dropped. DATA may not.
    assert agent.receive_data(encode_window(1, 10)) == []
    assert _failure(agent, encode_data(1, b"x")) == "stream_closed"


def test_frames_in_flight_on_a_stream_this_side_reset_are_dropped_and_their_window_returned() -> (
    None
):
    agent = TunnelMux(Role.AGENT, window=1000, connection_window=1000)
    agent.receive_data(encode_open(1, "svc"))
    agent.reset(1, "cancel")
    agent.data_to_send()
    assert agent.receive_data(encode_data(1, b"x" * 600) + encode_end(1)) == []
    # The connection's window came back: the next stream may have all of it again.
    assert agent.data_to_send() == encode_window(0, 600)
    events = agent.receive_data(encode_open(3, "svc") + encode_data(3, b"y" * 1000))
    assert StreamReadable(3) in events


def test_a_failure_resets_every_open_stream_with_its_code() -> None:
    agent = TunnelMux(Role.AGENT)
    agent.receive_data(encode_open(1, "a") + encode_open(3, "b"))
    events = agent.receive_data(encode_data(9, b"x"))
    assert events[:2] == [
        StreamReset(1, "unknown_stream", remote=False),
        StreamReset(3, "unknown_stream", remote=False),
    ]
    assert agent.data_to_send() == b""
    assert agent.receive_data(encode_open(5, "c")) == []


def test_a_lost_connection_resets_every_stream() -> None:
    coordinator = TunnelMux(Role.COORDINATOR)
    ids = [coordinator.open("svc") for _ in range(3)]
    assert coordinator.connection_lost() == [
        StreamReset(i, "connection_lost", remote=False) for i in ids
    ]
    assert coordinator.open_streams == 0


# -- flow control and the scheduler ---------------------------------------------------------


def test_a_sender_stops_at_the_window_and_goes_on_as_the_receiver_reads() -> None:
    coordinator, agent = _pair(window=4096, connection_window=1 << 20)
    sid = coordinator.open("svc")
    coordinator.send(sid, b"z" * 10_000)
    _deliver(coordinator, agent)
    assert agent.readable(sid) == 4096
    assert coordinator.buffered(sid) == 10_000 - 4096
    assert agent.read(sid, 1000) == b"z" * 1000
    assert _deliver(agent, coordinator) == []  # under half a window read: no grant yet
    agent.read(sid, 1048)
    _deliver(agent, coordinator)  # 2048 granted
    _deliver(coordinator, agent)
    assert agent.readable(sid) == 4096 - 2048 + 2048
    assert coordinator.buffered(sid) == 10_000 - 4096 - 2048


def test_a_read_wants_the_writer_only_when_it_grants_a_window_or_finishes_a_stream() -> None:
    coordinator, agent = _pair(window=4096, connection_window=1 << 20)
    sid = coordinator.open("svc")
    coordinator.send(sid, b"z" * 3000)
    _deliver(coordinator, agent)
    assert not agent.wants_write
    agent.read(sid, 1000)
    assert not agent.wants_write  # under half a window: nothing to send
    agent.read(sid, 1048)
    assert agent.wants_write  # a WINDOW is due
    _deliver(agent, coordinator)
    assert not agent.wants_write
    coordinator.end(sid)
    _deliver(coordinator, agent)
    agent.end(sid)
    _deliver(agent, coordinator)
    assert not agent.wants_write
    agent.read(sid, 4096)
    assert agent.wants_write  # the stream is over both ways and read out
    assert agent.take_finished() == [sid]
    assert not agent.wants_write


def test_control_frames_go_ahead_of_queued_data() -> None:
    coordinator, agent = _pair()
    bulk = coordinator.open("bulk")
    _deliver(coordinator, agent)
    coordinator.send(bulk, b"b" * (1 << 20))
    other = coordinator.open("svc")
    coordinator.reset(bulk, "cancel")
    message = coordinator.data_to_send()
    assert decode_frames(message) == [Open(other, "svc"), Reset(bulk, "cancel")]


def test_stream_ids_used_up_refuse_the_open_with_ids_exhausted() -> None:
    coordinator = TunnelMux(Role.COORDINATOR)
    coordinator._next_id = 2**31 - 1  # after 2^30 opens
    assert coordinator.open("svc") == 2**31 - 1
    with pytest.raises(LimitExceeded) as refused:
        coordinator.open("svc")
    assert refused.value.code == "ids_exhausted"


def test_a_backlog_of_control_frames_goes_out_in_bounded_messages() -> None:
    coordinator = TunnelMux(Role.COORDINATOR, max_streams=20_000)
    target = "t" * 128
    ids = [coordinator.open(target) for _ in range(10_000)]
    messages = []
    while message := coordinator.data_to_send():
        messages.append(message)
    # Each within what the peer's websocket takes (1 MiB), give or take a frame.
    assert max(map(len, messages)) <= MAX_BATCH_BYTES + 9 + 128
    assert [f for m in messages for f in decode_frames(m)] == [Open(i, target) for i in ids]


def test_streams_with_data_take_turns_in_bounded_chunks() -> None:
    coordinator, agent = _pair()
    a, b = coordinator.open("a"), coordinator.open("b")
    _deliver(coordinator, agent)
    coordinator.send(a, b"a" * (4 * CHUNK_BYTES))
    coordinator.send(b, b"b" * (2 * CHUNK_BYTES))
    frames = decode_frames(coordinator.data_to_send(max_bytes=3 * (CHUNK_BYTES + 9)))
    assert [(f.stream_id, len(f.data)) for f in frames if isinstance(f, Data)] == [
        (a, CHUNK_BYTES),
        (b, CHUNK_BYTES),
        (a, CHUNK_BYTES),
    ]
