"""A JobService on a real store, and a node (a :class:`Peer`) it may offer jobs to."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.protocol import crypto
from coordinator import keys
from coordinator.db import DbTarget
from coordinator.job_service import JobService
from coordinator.sessions import OpenSessions
from coordinator.store import Store
from support.coordinator_peer import Peer

__all__ = ["Jobs", "jobs_in"]


class Jobs:
    """The service, its store and key, and a node not yet seen (:meth:`seen` records it)."""

    def __init__(self, tmp_path: Path, store: DbTarget | None = None) -> None:
        self.key = keys.load_or_create(tmp_path / "state")
        self.store = Store(tmp_path / "coordinator.db" if store is None else store)
        self.service = JobService(self.store, self.key, OpenSessions(), time.time)
        self.peer = Peer()

    def seen(self) -> None:
        """The node connected once: offers may be made to it."""
        self.store.nodes.seen(self.peer.node_id, crypto.b64encode(self.peer.public_key), 1.0)


@contextmanager
def jobs_in(tmp_path: Path, store: DbTarget | None = None) -> Iterator[Jobs]:
    """:class:`Jobs` in ``tmp_path`` (its store there, or at ``store``), closed after."""
    jobs = Jobs(tmp_path, store)
    try:
        yield jobs
    finally:
        jobs.store.close()
