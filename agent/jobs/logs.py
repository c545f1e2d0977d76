"""A job's output on its way to the coordinator: bounded ``job_log`` chunks, batched.

The runner yields output as the container writes it, often a line at a time; storing and
queueing each piece would cost one SQLite transaction (an fsync) per line. The forwarder
decodes it as UTF-8 per stream (a character split across reads is kept whole), joins
adjacent pieces, and commits them in batches: when enough has gathered, every
``interval`` seconds, and at the end.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Callable, Iterable
from typing import Literal

from agent.jobs.machine import Decision, forward_logs

__all__ = ["CHUNK_BYTES", "LogForwarder", "merge"]

#: Raw output bytes per job_log chunk: after UTF-8 decoding with replacement a chunk is at
#: most three times this, well under the protocol's MAX_LOG_CHUNK_BYTES.
CHUNK_BYTES = 16 * 1024

Commit = Callable[[Decision], None]
"""Carries out a decision (the job manager's ``_carry_out``)."""


class LogForwarder:
    """Turns a job's output into bounded ``job_log`` chunks, stored and queued in batches:
    one transaction per flush, not one per line."""

    def __init__(self, job_id: str, commit: Commit) -> None:
        self.job_id = job_id
        self.commit = commit
        self.pending: list[tuple[str, str]] = []
        self.size = 0
        self.decoders = {
            name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")
        }

    def add(self, stream: Literal["stdout", "stderr"], data: bytes) -> None:
        decoder = self.decoders[stream]
        for start in range(0, len(data), CHUNK_BYTES):
            text = decoder.decode(data[start : start + CHUNK_BYTES])
            if text:
                self.pending.append((stream, text))
                self.size += len(text)
        if self.size >= 4 * CHUNK_BYTES:
            self.flush()

    def flush(self, *, final: bool = False) -> None:
        if final:
            for stream, decoder in self.decoders.items():
                if tail := decoder.decode(b"", final=True):
                    self.pending.append((stream, tail))
        if not self.pending:
            return
        chunks = merge(self.pending)
        self.pending, self.size = [], 0
        self.commit(forward_logs(self.job_id, chunks))

    async def flush_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.flush()


def merge(pieces: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Adjacent pieces of one stream joined, up to the chunk size."""
    merged: list[tuple[str, str]] = []
    for stream, text in pieces:
        if merged and merged[-1][0] == stream and len(merged[-1][1]) + len(text) <= CHUNK_BYTES:
            merged[-1] = (stream, merged[-1][1] + text)
        else:
            merged.append((stream, text))
    return merged
