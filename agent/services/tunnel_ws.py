"""The agent's writes of tunnel messages: framed and masked here, written on the data
connection's transport (docs/protocol.md, "The data connection").

websockets' ``send()`` takes each message through a lock, two context managers and a
frame serialisation that copies the masked payload into a ``BytesIO`` and out again; the
tunnel's messages (binary, whole, up to 256 KiB, one writer) need none of it. This writes
the same RFC 6455 frame (section 5.2: FIN, opcode 2, the mask bit, the length; section
5.3: a fresh random 4-byte masking key, the payload masked with it), masking the
machine's pieces as they are (:meth:`agent.protocol.tunnel.TunnelMux.parts_to_send`)
instead of joining them first: the payload is copied twice (masked, then joined with the
header), not four times. The frame goes on the transport whole, as websockets writes its
own (pings, pongs, close): frames never interleave. Its flow control is websockets': the
writer waits while the transport's buffer is over its high-water mark.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence
from typing import Final

from websockets.asyncio.client import ClientConnection
from websockets.protocol import State

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension, as websockets falls back
    from websockets.utils import apply_mask

from agent.protocol.tunnel_stream import Buffer

__all__ = ["MessageWriter", "encode_message"]

#: FIN and opcode 2 (binary); the mask bit (RFC 6455 section 5.2).
_FIN_BINARY: Final = 0x82
_MASKED: Final = 0x80
_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")
#: Masking keys' bytes drawn at once.
_KEY_POOL: Final = 4096


def encode_message(parts: Sequence[Buffer], key: bytes) -> bytes:
    """One masked binary frame of the pieces' bytes, in order, masked with ``key``."""
    size = sum(len(part) for part in parts)
    if size < 126:
        header = _SHORT.pack(_FIN_BINARY, _MASKED | size)
    elif size < 1 << 16:
        header = _MEDIUM.pack(_FIN_BINARY, _MASKED | 126, size)
    else:
        header = _LONG.pack(_FIN_BINARY, _MASKED | 127, size)
    out: list[bytes] = [header, key]
    offset = 0
    for part in parts:
        # The key applies from the payload's first byte: a piece at offset o starts at
        # the key's byte o % 4.
        turn = offset % 4
        out.append(apply_mask(part, key[turn:] + key[:turn]))
        offset += len(part)
    return b"".join(out)


class MessageWriter:
    """Writes one data connection's binary messages."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._keys = b""
        self._next = 0

    async def send(self, parts: Sequence[Buffer]) -> None:
        """Write one binary message of the pieces' bytes, and wait while the transport's
        buffer is full.

        Raises:
            ConnectionClosed: the connection is closing or closed (as ``ws.send`` raises).
        """
        ws = self._ws
        if ws.protocol.state is not State.OPEN:
            await ws.send(b"".join(parts))  # raises ConnectionClosed as websockets does
            return
        ws.transport.write(encode_message(parts, self._key()))
        if ws.paused:
            await ws.drain()

    def _key(self) -> bytes:
        """A fresh masking key: 4 bytes of the system's CSPRNG, drawn 4 KiB at a time
        (one getrandom call per 1,024 messages, not one each)."""
        if self._next == len(self._keys):
            self._keys, self._next = secrets.token_bytes(_KEY_POOL), 0
        key = self._keys[self._next : self._next + 4]
        self._next += 4
        return key
