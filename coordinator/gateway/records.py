"""Request records, written to the store in batches.

A record is kept in memory and written with the others of the last ``flush_s`` in one
commit: the store syncs each commit to disk (``synchronous=FULL``), and one sync per
request would cost each request a disk flush. A crash loses at most that last second of
records, which acknowledge nothing to anyone. The batch is bounded: past
:data:`MAX_PENDING` the oldest records are dropped (and counted) rather than the memory
growing with a store that cannot keep up.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Final

from coordinator.db import driver_errors
from coordinator.gateway.tables import RequestRecord, RequestTable

__all__ = ["MAX_PENDING", "RecordWriter"]

MAX_PENDING: Final = 10_000

_log = logging.getLogger(__name__)


class RecordWriter:
    """Keeps records, writes them every ``flush_s``, holds the table to ``keep_rows``."""

    def __init__(self, table: RequestTable, *, flush_s: float, keep_rows: int) -> None:
        self._table = table
        self._flush_s = flush_s
        self._keep_rows = keep_rows
        self._pending: deque[RequestRecord] = deque(maxlen=MAX_PENDING)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        """Records dropped because the batch was full."""

    def add(self, record: RequestRecord) -> None:
        """Keep a record for the next write."""
        if len(self._pending) == MAX_PENDING:
            self.dropped += 1
        self._pending.append(record)

    def start(self) -> None:
        """Write every ``flush_s`` until :meth:`stop`."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop, and write what is kept."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.flush()

    def flush(self) -> None:
        """Write the kept records now."""
        if not self._pending:
            return
        batch = list(self._pending)
        self._pending.clear()
        try:
            self._table.add(batch, self._keep_rows)
        except driver_errors():
            # Said, and the batch dropped: records are statistics, and a store that fails
            # would otherwise grow the batch to its bound at every pass.
            _log.exception("gateway: %d request record(s) not written", len(batch))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            self.flush()
