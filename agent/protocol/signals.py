"""How both ends' processes stop: SIGINT and SIGTERM set an event of their loop.

Here, beside the protocol both sides share, because both processes call it at start-up
(``gpu-agent run``, ``gpu-coordinator serve``), as :mod:`agent.protocol.memory`; it does no
I/O.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import FrameType

__all__ = ["stop_on_signals"]


def stop_on_signals(stop: asyncio.Event) -> Callable[[], None]:
    """SIGINT and SIGTERM set ``stop`` (call in the loop's thread); returns what puts the
    handlers before back.

    Through Python's own handler, not the loop's ``add_signal_handler``: that one hears of
    a signal by a byte on the loop's wakeup socket, which a loop far behind leaves full
    (threads wake it: the coordinator's writer at every commit), and a signal whose byte
    found it full was lost: the process ran on after SIGTERM, until systemd's SIGKILL.
    """
    loop = asyncio.get_running_loop()

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(stop.set)  # queued whether or not its wakeup byte fits

    before = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for signum, previous in before.items():
            signal.signal(signum, previous)

    return restore
