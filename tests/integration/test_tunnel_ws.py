"""The agent's own framing of tunnel messages is RFC 6455's, as websockets parses it."""

from __future__ import annotations

from typing import cast

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from agent.services.tunnel_ws import MessageWriter, encode_message


def _parse(wire: bytes) -> Frame:
    """The one frame ``wire`` holds, parsed as a server parses a client's (masked)."""
    reader = StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=True)
    with pytest.raises(StopIteration) as done:
        next(parser)
    frame: Frame = done.value.value
    assert not reader.buffer  # nothing after the frame
    return frame


@pytest.mark.parametrize("sizes", [[1], [9, 116], [9, 5, 3, 65_536], [7] * 3 + [300_001], [125]])
def test_a_message_of_pieces_is_one_masked_binary_frame_of_their_bytes(sizes: list[int]) -> None:
    parts = [bytes((n * 31 + i) % 256 for i in range(size)) for n, size in enumerate(sizes)]
    # Pieces as the machine hands them: bytes, and views into bigger buffers.
    pieces = [memoryview(b"xx" + p)[2:] if n % 2 else p for n, p in enumerate(parts)]
    wire = encode_message(pieces, b"\x9a\x0b\xfe\x31")
    frame = _parse(wire)
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.BINARY, True, b"".join(parts))
    assert b"".join(parts) not in wire  # masked on the wire


def test_the_length_takes_the_shortest_of_its_three_forms() -> None:
    key = b"\x00\x00\x00\x00"
    assert len(encode_message([b"a" * 125], key)) == 2 + 4 + 125
    assert len(encode_message([b"a" * 126], key)) == 4 + 4 + 126
    assert len(encode_message([b"a" * 65_536], key)) == 10 + 4 + 65_536


def test_each_message_gets_a_masking_key_of_its_own() -> None:
    writer = MessageWriter(cast(ClientConnection, None))
    keys = [writer._key() for _ in range(3000)]  # across draws of the pool
    assert all(len(key) == 4 for key in keys)
    assert len(set(keys)) > 2990  # 2^32 keys: a repeat or two by chance, not a pattern
