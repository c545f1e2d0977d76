"""The tunnel's binary frames: their layout, their limits, encoding and decoding.

A tunnel connection (docs/protocol.md, "Tunnel") carries binary websocket messages, each
one or more whole frames. A frame is a 9-byte header and its payload::

    type u8 | stream id u32 | payload length u32 | payload

    OPEN    1  stream (opener's parity)  target name: 1..128 bytes of [A-Za-z0-9._:-],
                                          starting with a letter or digit
    DATA    2  stream                    1..MAX_DATA_BYTES bytes
    WINDOW  3  stream, or 0: connection  increment u32, 1..2^31-1
    END     4  stream                    empty: the sender sends no more (half-close)
    RESET   5  stream                    code: 1..32 bytes of [a-z0-9_], starting a-z

Integers are big-endian. Anything else (a truncated frame, an unknown type, a payload over
its limit or of the wrong shape, a stream id over 2^31-1) is a :class:`TunnelError`: the
connection is refused, never parsed further.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

from agent.protocol.errors import TunnelError

__all__ = [
    "HEADER_BYTES",
    "MAX_DATA_BYTES",
    "MAX_STREAM_ID",
    "MAX_TARGET_BYTES",
    "MAX_WINDOW",
    "Data",
    "End",
    "Frame",
    "FrameType",
    "Open",
    "Reset",
    "Window",
    "data_header",
    "decode_frames",
    "encode_data",
    "encode_end",
    "encode_open",
    "encode_reset",
    "encode_window",
]

_HEADER = struct.Struct(">BII")
_U32 = struct.Struct(">I")
HEADER_BYTES: Final = _HEADER.size
#: Largest DATA payload; senders cut smaller chunks (the scheduler's fairness unit).
MAX_DATA_BYTES: Final = 64 * 1024
#: Longest target name, in bytes.
MAX_TARGET_BYTES: Final = 128
#: Largest stream id, and largest window (RFC 9113 section 6.9.1: 2^31-1).
MAX_STREAM_ID: Final = 2**31 - 1
MAX_WINDOW: Final = 2**31 - 1
_TARGET = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_CODE = re.compile(rb"[a-z][a-z0-9_]{0,31}")


class FrameType(enum.IntEnum):
    """A frame's type byte."""

    OPEN = 1
    DATA = 2
    WINDOW = 3
    END = 4
    RESET = 5


@dataclass(frozen=True, slots=True)
class Open:
    """Open stream ``stream_id`` to the service named ``target``."""

    stream_id: int
    target: str


@dataclass(frozen=True, slots=True)
class Data:
    """Bytes of a stream, within the receiver's windows."""

    stream_id: int
    data: bytes | memoryview
    """A view into the message it came in: no copy until the application reads it."""


@dataclass(frozen=True, slots=True)
class Window:
    """The receiver read ``increment`` more bytes: the sender may send that many more."""

    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class End:
    """The sender sends no more on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Reset:
    """The stream is over in both directions, for the reason ``code``."""

    stream_id: int
    code: str


Frame: TypeAlias = Open | Data | Window | End | Reset


def _frame(kind: FrameType, stream_id: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, stream_id, len(payload)) + payload


def encode_open(stream_id: int, target: str) -> bytes:
    """An OPEN frame; ValueError for a target name the peer would refuse."""
    raw = target.encode("ascii", "replace")
    if not _TARGET.fullmatch(raw):
        raise ValueError(f"bad target name {target!r}")
    return _frame(FrameType.OPEN, stream_id, raw)


def encode_data(stream_id: int, data: bytes) -> bytes:
    """A DATA frame (1..MAX_DATA_BYTES bytes)."""
    return data_header(stream_id, len(data)) + data


def data_header(stream_id: int, size: int) -> bytes:
    """The header of a DATA frame of ``size`` bytes (the payload follows it)."""
    assert 0 < size <= MAX_DATA_BYTES
    return _HEADER.pack(FrameType.DATA, stream_id, size)


def encode_window(stream_id: int, increment: int) -> bytes:
    """A WINDOW frame (stream 0: the connection's window)."""
    assert 0 < increment <= MAX_WINDOW
    return _frame(FrameType.WINDOW, stream_id, _U32.pack(increment))


def encode_end(stream_id: int) -> bytes:
    """An END frame."""
    return _frame(FrameType.END, stream_id)


def encode_reset(stream_id: int, code: str) -> bytes:
    """A RESET frame; ValueError for a code the peer would refuse."""
    raw = code.encode("ascii", "replace")
    if not _CODE.fullmatch(raw):
        raise ValueError(f"bad reset code {code!r}")
    return _frame(FrameType.RESET, stream_id, raw)


def decode_frames(message: bytes) -> list[Frame]:
    """The frames of one binary message, in order.

    Raises:
        TunnelError: ``bad_frame`` (truncated, bad shape), ``unknown_frame``,
            ``frame_too_large``, ``bad_target``, ``bad_stream_id`` (over 2^31-1).
    """
    frames: list[Frame] = []
    view = memoryview(message)
    at, size = 0, len(message)
    if size == 0:
        raise TunnelError("bad_frame", "an empty message")
    while at < size:
        if size - at < HEADER_BYTES:
            raise TunnelError("bad_frame", f"a truncated header at byte {at}")
        kind, stream_id, length = _HEADER.unpack_from(message, at)
        at += HEADER_BYTES
        if length > MAX_DATA_BYTES:
            raise TunnelError("frame_too_large", f"a payload of {length} bytes")
        if length > size - at:
            raise TunnelError("bad_frame", f"a payload of {length} bytes, {size - at} left")
        if stream_id > MAX_STREAM_ID:
            raise TunnelError("bad_stream_id", f"stream id {stream_id} over 2^31-1")
        payload = view[at : at + length]
        at += length
        frames.append(_decode_one(kind, stream_id, payload))
    return frames


def _decode_one(kind: int, stream_id: int, payload: memoryview) -> Frame:
    if kind == FrameType.DATA:
        if not payload:
            raise TunnelError("bad_frame", f"an empty DATA frame on stream {stream_id}")
        return Data(stream_id, payload)
    if kind == FrameType.WINDOW:
        if len(payload) != _U32.size:
            raise TunnelError("bad_frame", f"a WINDOW payload of {len(payload)} bytes")
        (increment,) = _U32.unpack(payload)
        if not 0 < increment <= MAX_WINDOW:
            raise TunnelError("bad_frame", f"a window increment of {increment}")
        return Window(stream_id, increment)
    if kind == FrameType.END:
        if payload:
            raise TunnelError("bad_frame", "an END frame with a payload")
        return End(stream_id)
    if kind == FrameType.OPEN:
        raw = bytes(payload)
        if len(raw) > MAX_TARGET_BYTES or not _TARGET.fullmatch(raw):
            raise TunnelError("bad_target", f"target name {raw[:MAX_TARGET_BYTES]!r}")
        return Open(stream_id, raw.decode("ascii"))
    if kind == FrameType.RESET:
        raw = bytes(payload)
        if not _CODE.fullmatch(raw):
            raise TunnelError("bad_frame", f"reset code {raw[:32]!r}")
        return Reset(stream_id, raw.decode("ascii"))
    raise TunnelError("unknown_frame", f"frame type {kind}")
