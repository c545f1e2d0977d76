"""The open session of each connected node, by node id: where a stored message is sent from.

It is what :class:`coordinator.job_service.Sessions` asks of the server: that a node's
session, if it is here, sends what is stored for the node and not sent yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

__all__ = ["OpenSessions", "Session"]


class Session(Protocol):
    """What :class:`OpenSessions` needs of one session."""

    node_id: str

    async def catch_up(self) -> None:
        """Send what is stored for the node and not sent yet."""


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

    async def deliver(self, node_id: str) -> None:
        """Send the node what is stored for it and not sent, if it is connected here (else
        the store keeps it for the session that holds it, or the node's next handshake)."""
        session = self._open.get(node_id)
        if session is not None:
            await session.catch_up()
