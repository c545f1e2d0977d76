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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import CTRL_OPCODES, Frame, Opcode
from websockets.typing import ExtensionParameter

__all__ = ["MIN_COMPRESSED_BYTES", "SmallUncompressed", "agent_extensions"]

#: Messages shorter than this go uncompressed.
MIN_COMPRESSED_BYTES = 1024


class SmallUncompressed(PerMessageDeflate):
    """permessage-deflate that sends one-frame messages under the threshold as they are."""

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
