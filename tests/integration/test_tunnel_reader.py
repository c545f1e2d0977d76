"""The coordinator's reader of the data connection (coordinator/tunnel_reader.py): whole
masked binary frames are delivered unmasked however the socket's reads cut them; control
frames go to websockets as they came; anything else, and all after it, goes to websockets
untouched, for it to judge as before."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import cast

import pytest
from support.tunnel_target import exchange, pattern, request
from support.tunnel_world import running_coordinator, running_node, running_target
from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode

from coordinator.tunnel_reader import FrameReader

_MAX = 1 << 20


class _Websocket:
    """What the reader hands on to websockets' connection, recorded."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.eof = False
        self.lost: list[Exception | None] = []

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> None:
        self.eof = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


def _reader() -> tuple[FrameReader, _Websocket, list[bytes]]:
    ws, delivered = _Websocket(), list[bytes]()
    reader = FrameReader(cast(ServerConnection, ws), delivered.append, _MAX)
    return reader, ws, delivered


def _feed(reader: FrameReader, wire: bytes, cuts: list[int]) -> None:
    """Feed ``wire`` as the transport would, in reads of the sizes ``cuts`` gives."""
    at = 0
    sizes = iter(cuts)
    while at < len(wire):
        buffer = reader.get_buffer(-1)
        size = min(next(sizes, len(wire)), len(buffer), len(wire) - at)
        buffer[:size] = wire[at : at + size]
        reader.buffer_updated(size)
        at += size


def _frame(opcode: Opcode, data: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    return Frame(opcode, data, fin=fin).serialize(mask=mask)


def _payload(n: int, size: int) -> bytes:
    return bytes((n * 7 + i) % 256 for i in range(size))


@pytest.mark.parametrize("seed", range(6))
def test_binary_messages_are_delivered_whole_and_pings_passed_on_however_reads_cut_them(
    seed: int,
) -> None:
    rng = random.Random(seed)
    sizes = [1, 125, 126, 65_535, 65_536, 300_000, _MAX, 9]
    payloads = [_payload(n, size) for n, size in enumerate(sizes)]
    ping = _frame(Opcode.PING, b"ka")
    wire = b"".join(
        _frame(Opcode.BINARY, p) + (ping if n % 3 == 0 else b"") for n, p in enumerate(payloads)
    )
    cuts = [rng.choice([1, 2, 3, 7, 100, 4096, 70_000, 1 << 20]) for _ in range(len(wire))]
    reader, ws, delivered = _reader()
    _feed(reader, wire, cuts)
    assert delivered == payloads
    assert bytes(ws.received) == ping * 3


@pytest.mark.parametrize(
    "odd",
    [
        _frame(Opcode.TEXT, b"hello"),
        _frame(Opcode.BINARY, b"part", fin=False) + _frame(Opcode.CONT, b"rest"),
        _frame(Opcode.BINARY, b"unmasked", mask=False),
        bytes([0x89, 0x80 | 126]) + struct.pack("!H", 126) + b"\0\0\0\0" + b"p" * 126,  # too long
        bytes([0x82 | 0x40, 0x80 | 3]) + b"\0\0\0\0abc",  # RSV1 set
        bytes([0x83, 0x80 | 3]) + b"\0\0\0\0abc",  # a reserved opcode
        bytes([0x82, 0x80 | 127]) + struct.pack("!Q", _MAX + 1) + b"\0\0\0\0",  # too large
    ],
)
def test_anything_else_goes_to_websockets_untouched_with_all_after_it(odd: bytes) -> None:
    before, after = _frame(Opcode.BINARY, b"first"), _frame(Opcode.BINARY, b"after")
    reader, ws, delivered = _reader()
    _feed(reader, before + odd + after, [len(before) + 1, 1, 1 << 20])
    assert delivered == [b"first"]
    assert bytes(ws.received) == odd + after


def test_the_end_of_the_connection_is_websockets_to_see() -> None:
    reader, ws, _ = _reader()
    assert reader.eof_received() is None
    reset = ConnectionResetError()
    reader.connection_lost(reset)
    assert ws.eof
    assert ws.lost == [reset]


async def test_the_coordinator_reads_a_node_s_data_connection_with_it(tmp_path: Path) -> None:
    async with (
        running_coordinator(tmp_path) as coordinator,
        running_target() as target,
        running_node(coordinator, target) as node,
    ):
        body = pattern(3 << 20, seed=3)
        stream = coordinator.tunnels.open(node.identity.node_id, "web")
        assert (await exchange(stream, request("POST", "/echo", body))).endswith(body)
        link = coordinator.tunnels._links[node.identity.node_id]
        assert isinstance(link.ws.transport.get_protocol(), FrameReader)
