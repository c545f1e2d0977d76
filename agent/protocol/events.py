"""What a connection machine (:mod:`agent.protocol.connection`) tells its driver to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from agent.protocol.errors import ProtocolError
from agent.protocol.messages import HelloBody, ReliableMessage, WelcomeBody

__all__ = ["Acked", "Authenticated", "Close", "Deliver", "Event", "PeerError", "Welcomed"]


@dataclass(frozen=True, slots=True)
class Welcomed:
    """Agent: ``welcome`` came; the session is open."""

    welcome: WelcomeBody


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Coordinator: the node proved it holds its key; the driver accepts or refuses it."""

    hello: HelloBody
    enrolment_token: str | None


@dataclass(frozen=True, slots=True)
class Deliver:
    """A new message of the peer's reliable stream, in order, once."""

    message: ReliableMessage


@dataclass(frozen=True, slots=True)
class Acked:
    """The peer stored everything of ours up to ``seq`` (more than it said before)."""

    seq: int


@dataclass(frozen=True, slots=True)
class PeerError:
    """The peer sent an ``error``."""

    code: str
    detail: str
    ref_seq: int | None


@dataclass(frozen=True, slots=True)
class Close:
    """Send what is queued, then close; ``error`` says why."""

    error: ProtocolError


Event: TypeAlias = Welcomed | Authenticated | Deliver | Acked | PeerError | Close
