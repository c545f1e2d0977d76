"""The open session of each connected node, by node id: where a stored message is sent from.

It is what :class:`coordinator.job_service.Sessions` asks of the server: the seq a node's
open session gives its next message, and sending a message once it is stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from agent.protocol.messages import ReliableBody
from agent.protocol.reliable import ReliableSender

__all__ = ["OpenSessions", "Session"]


class Session(Protocol):
    """What :class:`OpenSessions` needs of one session."""

    node_id: str
    sender: ReliableSender
    """Numbers the coordinator's stream to the node while the session is open."""

    async def send_stored(self, body: ReliableBody, seq: int) -> None:
        """Number ``body``, just stored as ``seq``, and send it."""


S = TypeVar("S", bound=Session)


class OpenSessions(Generic[S]):
    """The open session of each connected node."""

    def __init__(self) -> None:
        self._open: dict[str, S] = {}

    def __iter__(self) -> Iterator[str]:
        """The node ids with an open session."""
        return iter(self._open)

    def get(self, node_id: str) -> S | None:
        """The node's open session, if any."""
        return self._open.get(node_id)

    def put(self, session: S) -> None:
        """Make ``session`` its node's open session."""
        self._open[session.node_id] = session

    def drop(self, session: S) -> None:
        """Forget ``session``, unless a newer one of its node took its place."""
        if self._open.get(session.node_id) is session:
            del self._open[session.node_id]

    def next_seq(self, node_id: str) -> int | None:
        """The seq the node's open session gives its next message; None: not connected."""
        session = self._open.get(node_id)
        return None if session is None else session.sender.next_seq

    async def send(self, node_id: str, body: ReliableBody, seq: int) -> None:
        """Send the message stored as ``seq`` if the node is connected (else the store keeps
        it for the node's next handshake)."""
        session = self._open.get(node_id)
        if session is not None:
            await session.send_stored(body, seq)
