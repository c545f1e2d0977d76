"""The agents' endpoint compresses large messages and sends small ones (acks) as they are,
and hands each message it inflated to its reader with the bytes it came as."""

from __future__ import annotations

import asyncio
import zlib

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from coordinator.compression import (
    MIN_COMPRESSED_BYTES,
    SmallUncompressed,
    agent_extensions,
    receive,
)


def pair() -> tuple[SmallUncompressed, PerMessageDeflate]:
    """The coordinator's side and the agent's, with context takeover as negotiated."""
    return SmallUncompressed(False, False, 12, 12, {"memLevel": 5}), PerMessageDeflate(
        False, False, 12, 12
    )


def test_a_small_message_goes_uncompressed_and_a_large_one_compressed() -> None:
    ours, theirs = pair()
    ack = b'{"v":1,"type":"ack","body":{"seq":7}}'
    sent = ours.encode(Frame(Opcode.TEXT, ack))
    assert not sent.rsv1
    assert sent.data == ack
    assert theirs.decode(sent).data == ack
    offer = b'{"pad":"' + b"x" * (2 * MIN_COMPRESSED_BYTES) + b'"}'
    sent = ours.encode(Frame(Opcode.TEXT, offer))
    assert sent.rsv1
    assert len(sent.data) < len(offer)
    assert theirs.decode(sent).data == offer


def test_compressed_messages_stay_in_step_around_uncompressed_ones() -> None:
    ours, theirs = pair()
    for n in range(20):
        data = (b"%d:" % n) + (b"abc" * (n * 100 if n % 2 else 5))
        assert theirs.decode(ours.encode(Frame(Opcode.TEXT, data))).data == data


def test_each_message_inflated_is_noted_with_the_bytes_it_came_as() -> None:
    ours = SmallUncompressed(True, True, 12, 12, {"memLevel": 5})
    theirs = PerMessageDeflate(True, True, 12, 12)
    text = b'{"samples":[' + b'{"t":1.0},' * 200 + b"{}]}"
    sent = theirs.encode(Frame(Opcode.TEXT, text))
    assert ours.decode(sent).data == text
    ours.decode(Frame(Opcode.PING, b"x"))  # control frames are no message
    ours.decode(Frame(Opcode.TEXT, b"plain"))  # uncompressed
    first = theirs.encode(Frame(Opcode.TEXT, text[:100], fin=False))
    ours.decode(first)
    ours.decode(theirs.encode(Frame(Opcode.CONT, text[100:])))  # in two frames
    assert list(ours.received) == [(len(text), sent.data), (0, None), (0, None)]
    inflater = zlib.decompressobj(wbits=-15)
    assert inflater.decompress(bytes(sent.data) + b"\x00\x00\xff\xff") == text


async def test_a_read_past_receive_makes_it_give_no_bytes_rather_than_wrong_ones() -> None:
    got: list[tuple[str | bytes, bytes | None]] = []

    async def handler(ws: ServerConnection) -> None:
        got.append(await receive(ws))
        await ws.recv()  # not through receive(): its bytes stay noted
        got.append(await receive(ws))
        got.append(await receive(ws))

    async with serve(
        handler, "127.0.0.1", 0, compression=None, extensions=agent_extensions()
    ) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}") as ws:
            for n in (1, 2, 3, 4):
                await ws.send("x" * 100 * n)
            async with asyncio.timeout(5):
                await ws.wait_closed()
    assert [(len(message), deflated is not None) for message, deflated in got] == [
        (100, True),
        (300, False),  # would have been message 2's bytes
        (400, False),  # the notes were dropped with it: none is trusted after
    ]
