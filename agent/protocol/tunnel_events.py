"""What the tunnel's machine (:mod:`agent.protocol.tunnel`) tells its driver, and the
names it gives sides and resets."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeAlias

from agent.protocol.errors import TunnelError

__all__ = [
    "ResetCode",
    "Role",
    "StreamEnded",
    "StreamOpened",
    "StreamReadable",
    "StreamReset",
    "TunnelEvent",
    "TunnelFailed",
]


class ResetCode(enum.StrEnum):
    """Why a stream was reset (the codes this code sends; a peer may send others)."""

    CANCEL = "cancel"  # the application gave up on it (a client went away)
    REFUSED = "refused"  # this side accepts no streams
    TOO_MANY_STREAMS = "too_many_streams"
    UNKNOWN_TARGET = "unknown_target"
    CONNECT_FAILED = "connect_failed"
    TARGET_ERROR = "target_error"  # the target's connection failed mid-stream
    CONNECTION_LOST = "connection_lost"  # never sent: the tunnel itself went


class Role(enum.Enum):
    """Which side: the coordinator opens odd stream ids, the agent even ones."""

    COORDINATOR = 1
    AGENT = 2


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream to ``target``: connect it, or reset it."""

    stream_id: int
    target: str


@dataclass(frozen=True, slots=True)
class StreamReadable:
    """The stream has bytes to read."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sends no more on the stream: reads give b"" once it is drained."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is over both ways, for ``code``; ``remote``: the peer reset it."""

    stream_id: int
    code: str
    remote: bool


@dataclass(frozen=True, slots=True)
class TunnelFailed:
    """The peer broke the rules: close the connection with the error's code."""

    error: TunnelError


TunnelEvent: TypeAlias = StreamOpened | StreamReadable | StreamEnded | StreamReset | TunnelFailed
