"""Kept-alive connections to the services: idle tunnel streams, a few per replica.

A request to a service is HTTP/1.1 over a tunnel stream, which the agent carries to one
TCP connection to the service's server. Once an answer has ended cleanly, and both sides
allow another request on the connection (no ``Connection: close``, a body framed by its
length or by chunks, nothing after it), the stream is kept here, idle, and the next
request to the same replica takes it: no new stream, no new connection to the server
(a server such as llama.cpp's takes a millisecond or two for each new one).

Bounded: at most ``max_idle`` streams per replica (the oldest closed for a newer one),
each for ``idle_s`` (shorter than the keep-alive time of common servers: 5 s for
llama.cpp's and uvicorn's, so the gateway closes first), and only while the replica is
ready: a replica seen leaving the ready set has its idle streams closed (a draining node
counts them as requests in flight). A stream that turns out closed by its server when
reused is replaced by a new one (:mod:`coordinator.gateway.proxy`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from coordinator.gateway.upstream import Upstream

__all__ = ["StreamPool"]


@dataclass(slots=True)
class _Idle:
    upstream: Upstream
    expiry: asyncio.TimerHandle


class StreamPool:
    """Idle streams by replica (job id), newest last."""

    def __init__(self, *, max_idle: int = 8, idle_s: float = 4.0) -> None:
        self.max_idle = max_idle
        self.idle_s = idle_s
        self._idle: dict[str, deque[_Idle]] = {}

    def idle(self, job_id: str) -> int:
        """How many streams to ``job_id`` are kept now."""
        return len(self._idle.get(job_id, ()))

    def take(self, job_id: str) -> Upstream | None:
        """The most recently used idle stream to ``job_id`` that is still usable (None:
        open a new one). The newest first: it is the least likely to be closed by its
        server."""
        kept = self._idle.get(job_id)
        while kept:
            entry = kept.pop()
            entry.expiry.cancel()
            if entry.upstream.idle_usable:
                if not kept:
                    del self._idle[job_id]
                return entry.upstream
            entry.upstream.close()
        self._idle.pop(job_id, None)
        return None

    def put(self, job_id: str, upstream: Upstream) -> None:
        """Keep a stream whose exchange ended cleanly, ready for the next request."""
        if self.max_idle <= 0:
            upstream.close()
            return
        kept = self._idle.setdefault(job_id, deque())
        if len(kept) >= self.max_idle:
            oldest = kept.popleft()
            oldest.expiry.cancel()
            oldest.upstream.close()
        loop = asyncio.get_running_loop()
        entry = _Idle(upstream, loop.call_later(self.idle_s, self._expire, job_id, upstream))
        kept.append(entry)

    def prune(self, live: Collection[str]) -> None:
        """Close the idle streams of replicas not in ``live`` (no longer ready)."""
        for job_id in [j for j in self._idle if j not in live]:
            self._close_all(job_id)

    def close(self) -> None:
        """Close every idle stream."""
        for job_id in list(self._idle):
            self._close_all(job_id)

    def _close_all(self, job_id: str) -> None:
        for entry in self._idle.pop(job_id, ()):
            entry.expiry.cancel()
            entry.upstream.close()

    def _expire(self, job_id: str, upstream: Upstream) -> None:
        kept = self._idle.get(job_id)
        if kept is None:
            return
        for entry in kept:
            if entry.upstream is upstream:
                kept.remove(entry)
                break
        if not kept:
            del self._idle[job_id]
        upstream.close()
