"""Telling the coordinator, systemd and the control API what the node can take."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec

from agent.daemon.systemd import Notifier
from agent.errors import OutboxError
from agent.jobs.node import NodeState
from agent.link.outbox import Outbox
from agent.protocol.bodies import NodeStatusBody

__all__ = ["NodeReporter", "status_line"]

_log = logging.getLogger(__name__)


class NodeReporter:
    """Queues a ``node_status`` whenever what the coordinator knows of the node changed
    (never before the GPUs were checked once), and tells systemd and the control API."""

    def __init__(
        self,
        node: NodeState,
        outbox: Outbox,
        *,
        notifier: Notifier,
        wake: Callable[[], None],
        running: Callable[[], int],
        publish: Callable[[], None],
    ) -> None:
        self.node = node
        self.outbox = outbox
        self.notifier = notifier
        self.wake = wake
        self.running = running
        self.publish = publish
        self._last: NodeStatusBody | None = None

    def report(self) -> None:
        """Queue the node's status if it changed, and publish to the control API."""
        self.publish()
        status = self.node.status()
        if status is None or status == self._last:
            return
        try:
            self.outbox.append("node_status", msgspec.json.encode(status), time.time())
        except OutboxError as exc:
            _log.error("cannot store the node status (%s); trying at the next change", exc)
            return
        self.sent(status)
        self.wake()

    def sent(self, status: NodeStatusBody | None) -> None:
        """``status`` is in the outbox: the next change is measured against it."""
        if status is None:
            return
        self._last = status
        self.notifier.status(status_line(status, self.running()))


def status_line(status: NodeStatusBody, running: int) -> str:
    """One line for ``systemctl status``."""
    healthy = sum(1 for u in status.units if u.health == "healthy")
    taking = "taking jobs" if status.available else f"not taking jobs ({status.reason})"
    return f"{taking}; {healthy}/{len(status.units)} GPU(s) healthy; {running} job(s) running"
