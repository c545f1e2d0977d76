"""permessage-deflate for agents' connections, with small messages sent uncompressed.

An agent's telemetry (one ~56 KB batch of JSON every 10 s) compresses about tenfold, so the
coordinator still negotiates permessage-deflate (RFC 7692) and inflates what agents send.
What the coordinator sends is mostly acks of a few dozen bytes: compressing each one costs
a zlib call and a sync flush for nothing (7% of the loop's time at 2,000 agents, issue 14).
RFC 7692 section 6 lets an endpoint send any message uncompressed (RSV1 unset) on a
connection that negotiated the extension, so messages under :data:`MIN_COMPRESSED_BYTES`
go as they are; larger ones (job offers, welcome with a backlog) are compressed as before.
Skipping a message leaves the compressor's window as it was, and the peer's decompressor
sees only compressed messages, so context takeover would stay in step; but neither side
takes context over (``server_no_context_takeover``, ``client_no_context_takeover``): a
connection then holds no zlib state between messages, ~50 KB less per idle agent, and with
4 KB windows a 56 KB batch gains next to nothing from the one before.

Each compressed message is therefore a raw DEFLATE stream of its own, and the coordinator
keeps it as it came (:func:`receive`): telemetry is stored as those bytes, about a tenth
of the text (docs/coordinator.md, "Telemetry stored as received").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from websockets.asyncio.connection import Connection
from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import CTRL_OPCODES, Frame, Opcode
from websockets.typing import ExtensionParameter

__all__ = ["MIN_COMPRESSED_BYTES", "SmallUncompressed", "agent_extensions", "receive"]

#: Messages shorter than this go uncompressed.
MIN_COMPRESSED_BYTES = 1024


class SmallUncompressed(PerMessageDeflate):
    """permessage-deflate that sends one-frame messages under the threshold as they are,
    and keeps each message it inflates as it came, for :func:`receive`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: deque[tuple[int, bytes | None]] = deque()
        """Per data message decoded and not yet received, in order: its length inflated and
        its deflated bytes, or ``(0, None)``: it came uncompressed, or in fragments. Bounded
        by the connection's queue of messages (``max_queue``)."""

    def decode(self, frame: Frame, *, max_size: int | None = None) -> Frame:
        """Inflate ``frame`` as permessage-deflate does; note a whole message's bytes."""
        if frame.opcode in CTRL_OPCODES:
            return frame
        whole = frame.fin and frame.opcode is not Opcode.CONT and frame.rsv1
        decoded = super().decode(frame, max_size=max_size)
        if frame.fin:
            self.received.append((len(decoded.data), bytes(frame.data)) if whole else (0, None))
        return decoded

    def encode(self, frame: Frame) -> Frame:
        """Leave a small message alone (RSV1 unset: uncompressed); else compress it."""
        if (
            frame.fin
            and frame.opcode is not Opcode.CONT
            and frame.opcode not in CTRL_OPCODES
            and len(frame.data) < MIN_COMPRESSED_BYTES
        ):
            return frame
        return super().encode(frame)


class _Factory(ServerPerMessageDeflateFactory):
    def process_request_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension]
    ) -> tuple[list[ExtensionParameter], PerMessageDeflate]:
        response, ext = super().process_request_params(params, accepted_extensions)
        return response, SmallUncompressed(
            ext.remote_no_context_takeover,
            ext.local_no_context_takeover,
            ext.remote_max_window_bits,
            ext.local_max_window_bits,
            ext.compress_settings,
        )


async def receive(ws: Connection) -> tuple[str | bytes, bytes | None]:
    """The next message of ``ws``, and the raw DEFLATE stream it came as (None: it came
    uncompressed or in fragments). Every read of an agent's connection goes through here,
    so that each message meets its own bytes."""
    message = await ws.recv()
    deflate = next((e for e in ws.protocol.extensions if isinstance(e, SmallUncompressed)), None)
    if deflate is None or not deflate.received:
        return message, None
    length, deflated = deflate.received.popleft()
    if deflated is not None and length != _utf8_length(message):
        # Not this message's bytes: a read that did not come through here. Stored as text.
        deflate.received.clear()
        return message, None
    return message, deflated


def _utf8_length(message: str | bytes) -> int:
    if isinstance(message, bytes):
        return len(message)
    return len(message) if message.isascii() else len(message.encode())


def agent_extensions() -> list[Any]:
    """The server extensions of the agents' endpoint (websockets' default settings)."""
    return [
        _Factory(
            server_no_context_takeover=True,
            client_no_context_takeover=True,
            server_max_window_bits=12,
            client_max_window_bits=12,
            compress_settings={"memLevel": 5},
        )
    ]
