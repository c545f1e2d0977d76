"""The cyclic garbage collector of a coordinator holding thousands of sessions.

A full collection walks every tracked object: with 10,000 sessions, each holding its
connection, tasks, buffers and protocol machines, that is a pause of hundreds of ms, and
the acks waiting behind it make the latency's tail (issue 14: p99 from 155-451 ms to 31 ms
at 2,000 agents once the sessions were frozen). So what lives long is moved out of the
collector's sight: :func:`gc.freeze` after start-up (in ``serve``), then once a
:data:`FREEZE_EVERY_S`, so that the sessions opened since join it; the collections then walk
only what is young. A frozen object is never collected, so cyclic garbage frozen with the
rest (a session that ended) would stay: once a :data:`SWEEP_EVERY_S` everything is thawed,
collected in one full pass, and frozen again.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

__all__ = ["FREEZE_EVERY_S", "SWEEP_EVERY_S", "keep_frozen", "sweep"]

_log = logging.getLogger(__name__)

FREEZE_EVERY_S = 30.0
SWEEP_EVERY_S = 600.0


def sweep() -> int:
    """Thaw everything, collect it in one full pass, freeze what is left; objects freed."""
    gc.unfreeze()
    start = time.perf_counter()
    freed = gc.collect()
    gc.freeze()
    _log.info("gc: %d object(s) freed in %.0f ms", freed, 1e3 * (time.perf_counter() - start))
    return freed


async def keep_frozen(
    freeze_every_s: float = FREEZE_EVERY_S, sweep_every_s: float = SWEEP_EVERY_S
) -> None:
    """Freeze now and every ``freeze_every_s``, sweep every ``sweep_every_s``, until cancelled."""
    gc.freeze()
    swept = time.monotonic()
    while True:
        await asyncio.sleep(freeze_every_s)
        if time.monotonic() - swept >= sweep_every_s:
            sweep()
            swept = time.monotonic()
        else:
            gc.freeze()
