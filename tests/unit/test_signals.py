"""``gpu-coordinator serve`` and ``gpu-agent run`` stop on SIGTERM even when their loop is
far behind."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

from agent.protocol.signals import stop_on_signals


async def test_a_sigterm_stops_the_process_while_the_loops_wakeup_socket_is_full() -> None:
    stop = asyncio.Event()
    restore = stop_on_signals(stop)
    try:
        loop = asyncio.get_running_loop()

        def wake_often() -> None:  # a writer thread's commits, to a loop that is behind
            for _ in range(500_000):
                loop.call_soon_threadsafe(lambda: None)

        # The loop does not run meanwhile: every wakeup byte stays in its socket.
        thread = threading.Thread(target=wake_often)
        thread.start()
        thread.join()
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(30):
            await stop.wait()
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
