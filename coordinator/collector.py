"""The cyclic garbage collector of a coordinator holding thousands of sessions.

A full collection walks every tracked object: with 10,000 sessions, each holding its
connection, tasks, buffers and protocol machines, that is a pause of hundreds of ms, and
the acks waiting behind it make the latency's tail (issue 14: p99 from 155-451 ms to 31 ms
at 2,000 agents once the sessions were frozen). So what lives long is moved out of the
collector's sight: :func:`gc.freeze` after start-up (in ``serve``), then once a
:data:`FREEZE_EVERY_S`, so that what was made since joins it; the collections then walk
only what is young. A frozen object is never collected, so cyclic garbage frozen with the
rest (a session that ended) would stay: once a :data:`SWEEP_EVERY_S` everything is thawed,
collected in one full pass, and frozen again.

Young is a second, not half a minute. Each frame a session handles replaces what it waits
on (the coroutines, futures and tasks of its next ``recv``: a dozen objects) with new ones
that then live until its next frame, 10 s on: at 10,000 agents, 15,000 objects a second
that survive every young collection. Frozen every 30 s, the young generations held
40,000-160,000 of them (sampled), and each collection of the middle one walked them all:
a pause of 40-120 ms every few seconds (and, as freeing a frozen object lowers the count
that calls the next collection, the youngest grew past its 700 too), at the ack p99 of the
steady window.
Frozen every second, they hold a second's worth: the ack p99 at 10,000 agents went from
229-328 ms to 19-45 ms (docs/coordinator.md, "The collector's young generations").

A burst of sessions is frozen sooner: after a restart every agent reconnects within seconds,
and until the next freeze each full collection walked every session opened since, again and
again as they grew by a quarter (15% of the coordinator's CPU per reconnect at 3,000 agents).
Each session counts itself (:func:`opened`); once :data:`FREEZE_AFTER_OPENED` have opened
since the last freeze, the next one comes within :data:`POLL_S`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

__all__ = [
    "FREEZE_AFTER_OPENED",
    "FREEZE_EVERY_S",
    "POLL_S",
    "SWEEP_EVERY_S",
    "keep_frozen",
    "opened",
    "sweep",
]

_log = logging.getLogger(__name__)

FREEZE_EVERY_S = 1.0
SWEEP_EVERY_S = 600.0
#: Sessions opened since the last freeze that make the next one due at once.
FREEZE_AFTER_OPENED = 100
#: How often :func:`keep_frozen` looks whether a freeze is due.
POLL_S = 1.0


class _Opened:
    count = 0
    """Sessions opened in this process (:func:`opened`)."""


def opened() -> None:
    """Count one session opened (a process-wide count, as the collector is)."""
    _Opened.count += 1


def sweep() -> int:
    """Thaw everything, collect it in one full pass, freeze what is left; objects freed."""
    gc.unfreeze()
    start = time.perf_counter()
    freed = gc.collect()
    gc.freeze()
    _log.info("gc: %d object(s) freed in %.0f ms", freed, 1e3 * (time.perf_counter() - start))
    return freed


async def keep_frozen(
    freeze_every_s: float = FREEZE_EVERY_S,
    sweep_every_s: float = SWEEP_EVERY_S,
    *,
    after_opened: int = FREEZE_AFTER_OPENED,
    poll_s: float = POLL_S,
) -> None:
    """Freeze now, then every ``freeze_every_s`` or once ``after_opened`` sessions have opened
    since the last freeze (looked at every ``poll_s``); sweep every ``sweep_every_s``; until
    cancelled."""
    gc.freeze()
    swept = frozen = time.monotonic()
    frozen_opened = _Opened.count
    while True:
        await asyncio.sleep(min(poll_s, freeze_every_s))
        now = time.monotonic()
        if now - frozen < freeze_every_s and _Opened.count - frozen_opened < after_opened:
            continue
        if now - swept >= sweep_every_s:
            sweep()
            swept = time.monotonic()
        else:
            gc.freeze()
        frozen, frozen_opened = time.monotonic(), _Opened.count
