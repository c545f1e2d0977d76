"""What keeps one bulk stream moving (docs/protocol.md, "Flow control"): its receive window
grows while its reader keeps up, and only then, so it is not held to a round trip per
half window, and a reader that stops holds no more of the connection than the window it
had; a service's read goes out as one message, not two."""

from __future__ import annotations

from agent.protocol.tunnel import MAX_BATCH_BYTES, Role, TunnelMux


def _pair(window: int, max_window: int) -> tuple[TunnelMux, TunnelMux]:
    coordinator = TunnelMux(Role.COORDINATOR, window=window, connection_window=1 << 20)
    agent = TunnelMux(Role.AGENT, window=window, connection_window=1 << 20, max_window=max_window)
    return coordinator, agent


def _carry(src: TunnelMux, dst: TunnelMux) -> None:
    while message := src.data_to_send():
        dst.receive_data(message)


def _rounds(read: int | None, rounds: int) -> list[int]:
    """Bytes that arrive per round trip of a bulk stream (the coordinator's) whose reader at
    the agent reads all that came (None) or ``read`` bytes each round."""
    coordinator, agent = _pair(window=4096, max_window=16384)
    sid = coordinator.open("svc")
    coordinator.send(sid, b"z" * 200_000)
    arrived = []
    for _ in range(rounds):
        before = agent.readable(sid)
        _carry(coordinator, agent)
        arrived.append(agent.readable(sid) - before)
        agent.read(sid, read if read is not None else agent.readable(sid))
        _carry(agent, coordinator)
    return arrived


def test_a_reader_that_keeps_up_doubles_its_window_up_to_the_most() -> None:
    assert _rounds(None, 6) == [4096, 8192, 16384, 16384, 16384, 16384]


def test_a_reader_that_falls_behind_keeps_the_window_it_has() -> None:
    # Half of what came is read each round: the reader, not the window, holds the stream
    # back, and what waits for it is never more than the first window.
    coordinator, agent = _pair(window=4096, max_window=16384)
    sid = coordinator.open("svc")
    coordinator.send(sid, b"z" * 200_000)
    held = []
    for _ in range(8):
        _carry(coordinator, agent)
        held.append(agent.readable(sid))
        agent.read(sid, 2048)
        _carry(agent, coordinator)
    assert max(held) == 4096


def test_a_reader_that_kept_up_then_stops_holds_at_most_the_grown_window() -> None:
    coordinator, agent = _pair(window=4096, max_window=16384)
    sid = coordinator.open("svc")
    coordinator.send(sid, b"z" * 200_000)
    for _ in range(4):
        _carry(coordinator, agent)
        agent.read(sid, agent.readable(sid))
        _carry(agent, coordinator)
    for _ in range(3):  # the reader stopped: nothing more is granted
        _carry(coordinator, agent)
        _carry(agent, coordinator)
    assert agent.readable(sid) == 16384


def test_streams_grow_together_within_a_quarter_of_the_connection_window() -> None:
    # A window of 4096 on a connection of 65536: 16384 of growth for all streams at once.
    coordinator = TunnelMux(Role.COORDINATOR, window=4096, connection_window=65536)
    agent = TunnelMux(Role.AGENT, window=4096, connection_window=65536, max_window=16384)
    first, second = coordinator.open("a"), coordinator.open("b")
    for sid in (first, second):
        coordinator.send(sid, b"z" * 200_000)
    for _ in range(6):
        _carry(coordinator, agent)
        for sid in (first, second):
            agent.read(sid, agent.readable(sid))
        _carry(agent, coordinator)
    _carry(coordinator, agent)
    # The first grew to 16384 (12288 more), the second by what was left: 4096.
    assert (agent.readable(first), agent.readable(second)) == (16384, 8192)
    # A stream over gives its growth back: the second grows on.
    agent.reset(first)
    _carry(agent, coordinator)
    for _ in range(3):
        agent.read(second, agent.readable(second))
        _carry(agent, coordinator)
        _carry(coordinator, agent)
    assert agent.readable(second) == 16384


def test_a_read_of_the_batch_size_goes_as_one_message() -> None:
    # A service's read of 256 KiB (asyncio's most) fills whole frames: no second message
    # of the bytes the frames' headers displaced.
    coordinator, agent = _pair(window=1 << 20, max_window=1 << 20)
    sid = agent_sid = coordinator.open("svc")
    _carry(coordinator, agent)
    agent.send(agent_sid, b"z" * MAX_BATCH_BYTES)
    first = agent.data_to_send()
    assert agent.data_to_send() == b""
    coordinator.receive_data(first)
    assert coordinator.readable(sid) == MAX_BATCH_BYTES


def test_what_all_streams_queued_is_counted_until_framed_or_dropped() -> None:
    # The agent pauses its services' reads by this count (agent/services/tunnel.py).
    coordinator, agent = _pair(window=4096, max_window=4096)
    first, second, third = (coordinator.open("svc") for _ in range(3))
    _carry(coordinator, agent)
    for sid in (first, second, third):
        agent.send(sid, b"z" * 10_000)
    assert agent.queued == 30_000
    agent.data_to_send()  # a window of each: 4096 bytes a stream framed
    assert agent.queued == 30_000 - 3 * 4096
    agent.reset(first)  # what it queued is dropped with it
    assert agent.queued == 2 * (10_000 - 4096)
    coordinator.reset(second)  # the peer's reset drops it alike
    _carry(coordinator, agent)
    assert agent.queued == 10_000 - 4096 == agent.buffered(third)
    agent.connection_lost()
    assert agent.queued == 0
